"""Validation must catch what it claims to: broken structure and wrong numbers."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from mha.export import ExportOptions
from mha.export.cases import parity_cases
from mha.export.sources import load_source
from mha.export.validate import (
    ExportValidationError,
    check_onnx,
    check_parity,
    check_structure,
    parity_failures,
)

FUSED = {("", "Attention"), ("com.microsoft", "MultiHeadAttention")}


@pytest.fixture(scope="module")
def ort_model(exported):
    return onnx.load(str(exported(target="ort") / "model.onnx"))


def session_of(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_a_clean_export_has_no_failures(ort_model):
    assert check_onnx(ort_model) == []
    assert check_structure(ort_model, "ort", True, False) == []


def test_extra_softmax_is_caught(ort_model):
    model = copy.deepcopy(ort_model)
    model.graph.node.append(helper.make_node("Softmax", ["query"], ["stray"], axis=-1))
    failures = check_structure(model, "ort", True, False)
    assert failures == ["1 Softmax node(s) in the graph, expected 0"]


def test_missing_fused_node_is_caught(ort_model):
    model = copy.deepcopy(ort_model)
    for node in model.graph.node:
        if (node.domain, node.op_type) in FUSED:
            node.op_type = "MultiHeadAttentionRenamed"
    failures = check_structure(model, "ort", True, False)
    assert failures == [
        "fused attention nodes [], expected exactly one com.microsoft.MultiHeadAttention"
    ]


def test_wrong_names_and_wrong_target_are_all_listed(ort_model):
    model = copy.deepcopy(ort_model)
    model.graph.output[0].name = "out"
    failures = check_structure(model, "onnx", True, False)
    assert failures[0] == "graph outputs ['out'], expected ['output']"
    assert failures[1].startswith("fused attention nodes ['com.microsoft.MultiHeadAttention']")
    assert len(failures) == 2


def test_checker_failure_is_reported(ort_model):
    model = copy.deepcopy(ort_model)
    model.graph.node.append(helper.make_node("Relu", ["no_such_tensor"], ["r"]))
    [failure] = check_onnx(model)
    assert failure.startswith("onnx.checker:") and "no_such_tensor" in failure


def test_wrong_weights_fail_parity_with_figures(ort_model):
    model = copy.deepcopy(ort_model)
    # Shift the output bias by 1e-3: every non-padded output element moves by exactly that.
    [init] = [t for t in model.graph.initializer if t.name == "mha.out_proj.bias"]
    array = numpy_helper.to_array(init) + np.float32(1e-3)
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    options = ExportOptions(d_model=64, num_heads=4)
    module = load_source(options, False).module
    results = check_parity(session_of(model), module, parity_cases(True), True, "fp32")
    failures = parity_failures(results)
    assert len(failures) == len(results)
    assert all("output max|diff| 0.001 exceeds atol 1e-05" in f for f in failures), failures


def test_untouched_model_passes_the_same_check(ort_model):
    options = ExportOptions(d_model=64, num_heads=4)
    module = load_source(options, False).module
    results = check_parity(session_of(ort_model), module, parity_cases(True), True, "fp32")
    assert parity_failures(results) == []


def test_validation_error_lists_every_failure():
    err = ExportValidationError(["a went wrong", "b went wrong"])
    assert err.failures == ["a went wrong", "b went wrong"]
    assert str(err) == "export validation failed:\n  a went wrong\n  b went wrong"
