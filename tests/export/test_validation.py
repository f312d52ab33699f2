"""Validation must catch what it claims to: broken structure and wrong numbers."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from mha.export import ExportOptions
from mha.export.cases import ParityCase, parity_cases
from mha.export.exporter import cpu_session
from mha.export.failures import (
    CheckerFailure,
    DtypeMismatch,
    ExportValidationError,
    FusedNodes,
    GraphNames,
    MissingOutput,
    NonFinite,
    RuntimeFailure,
    ShapeMismatch,
    SoftmaxCount,
    ToleranceExceeded,
)
from mha.export.sources import load_source
from mha.export.validate import (
    check_onnx,
    check_parity,
    check_structure,
    compare,
    output_failure,
    parity_failures,
)
from mha.model import AttentionConfig

FUSED = {("", "Attention"), ("com.microsoft", "MultiHeadAttention")}


@pytest.fixture(scope="module")
def ort_model(exported):
    return onnx.load(str(exported(target="ort") / "model.onnx"))


@pytest.fixture(scope="module")
def module():
    options = ExportOptions(d_model=64, num_heads=4)
    return load_source(options, False).module


def session_of(model: onnx.ModelProto) -> ort.InferenceSession:
    return cpu_session(model.SerializeToString())


def test_a_clean_export_has_no_failures(ort_model):
    assert check_onnx(ort_model) == []
    assert check_structure(ort_model, "ort", True, False) == []


def test_extra_softmax_is_caught(ort_model):
    model = copy.deepcopy(ort_model)
    model.graph.node.append(helper.make_node("Softmax", ["query"], ["stray"], axis=-1))
    [failure] = check_structure(model, "ort", True, False)
    assert isinstance(failure, SoftmaxCount)
    assert (failure.found, failure.expected) == (1, 0)


def test_missing_fused_node_is_caught(ort_model):
    model = copy.deepcopy(ort_model)
    for node in model.graph.node:
        if (node.domain, node.op_type) in FUSED:
            node.op_type = "MultiHeadAttentionRenamed"
    [failure] = check_structure(model, "ort", True, False)
    assert isinstance(failure, FusedNodes)
    assert failure.found == () and failure.expected == "com.microsoft.MultiHeadAttention"


def test_wrong_names_and_wrong_target_are_all_listed(ort_model):
    model = copy.deepcopy(ort_model)
    model.graph.output[0].name = "out"
    names, node = check_structure(model, "onnx", True, False)
    assert isinstance(names, GraphNames) and names.role == "outputs"
    assert (names.found, names.expected) == (("out",), ("output",))
    assert (names.missing, names.extra) == (("output",), ("out",))
    assert isinstance(node, FusedNodes)
    assert node.found == ("com.microsoft.MultiHeadAttention",) and node.expected == "Attention"


def test_checker_failure_is_reported(ort_model):
    model = copy.deepcopy(ort_model)
    model.graph.node.append(helper.make_node("Relu", ["no_such_tensor"], ["r"]))
    [failure] = check_onnx(model)
    assert isinstance(failure, CheckerFailure) and "no_such_tensor" in failure.message


def test_wrong_weights_fail_parity_with_figures(ort_model, module):
    model = copy.deepcopy(ort_model)
    # Shift the output bias by 1e-3: every non-padded output element moves by exactly that.
    [init] = [t for t in model.graph.initializer if t.name == "mha.out_proj.bias"]
    array = numpy_helper.to_array(init) + np.float32(1e-3)
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    cases = parity_cases(True)
    results = check_parity(session_of(model), module, cases, True, "fp32")
    failures = parity_failures(results)
    assert [f.case_id for f in failures] == [c.id(True) for c in cases]
    for f in failures:
        assert isinstance(f, ToleranceExceeded) and f.output == "output"
        assert f.max_abs == pytest.approx(1e-3, abs=5e-6)  # prints as 0.001
        assert (f.atol, f.rtol) == (1e-5, 0.0)
        assert f.worst == pytest.approx(f.max_abs / 1e-5)
    assert all("output max|diff| 0.001 exceeds atol 1e-05" in str(f) for f in failures)


def test_untouched_model_passes_the_same_check(ort_model, module):
    results = check_parity(session_of(ort_model), module, parity_cases(True), True, "fp32")
    assert parity_failures(results) == []


def test_a_session_without_the_output_is_caught(ort_model, module):
    model = copy.deepcopy(ort_model)
    model.graph.output[0].name = "out"
    for node in model.graph.node:  # rename it where it is produced, so the model still loads
        node.output[:] = ["out" if name == "output" else name for name in node.output]
    case = ParityCase(2, 3, 3)
    [result] = check_parity(session_of(model), module, [case], True, "fp32")
    [failure] = result.failures
    assert isinstance(failure, MissingOutput)
    assert (failure.case_id, failure.output, failure.outputs) == ("B2-L3", "output", ("out",))


def test_an_onnxruntime_error_is_caught(ort_model, module):
    # A case with the wrong feature size: ORT refuses the input.
    wrong = copy.deepcopy(module)
    wrong.config = AttentionConfig(d_model=32, num_heads=4)
    [result] = check_parity(session_of(ort_model), wrong, [ParityCase(1, 2, 2)], True, "fp32")
    [failure] = result.failures
    assert isinstance(failure, RuntimeFailure) and failure.case_id == "B1-L2"
    assert failure.message


def output_failure_of(got: np.ndarray, want: np.ndarray, dtype=np.float32):
    error = compare("output", got, want, atol=1e-5)
    return output_failure("B1-L2", error, got, want, np.dtype(dtype))


def test_each_output_problem_has_its_own_kind():
    want = np.zeros((1, 2, 4), np.float32)
    shape = output_failure_of(np.zeros((1, 2, 3), np.float32), want)
    assert isinstance(shape, ShapeMismatch)
    assert (shape.output, shape.found, shape.expected) == ("output", (1, 2, 3), (1, 2, 4))
    dtype = output_failure_of(want.astype(np.float16), want)
    assert isinstance(dtype, DtypeMismatch) and (dtype.found, dtype.expected) == (
        "float16",
        "float32",
    )
    nan = want.copy()
    nan[0, 1, :2] = np.nan
    non_finite = output_failure_of(nan, want)
    assert isinstance(non_finite, NonFinite) and non_finite.count == 2
    assert output_failure_of(want + np.float32(1e-6), want) is None


def test_validation_error_carries_the_failures_and_reads_as_before():
    failures = [
        SoftmaxCount(found=1, expected=0),
        FusedNodes(found=(), expected="com.microsoft.MultiHeadAttention"),
        GraphNames("outputs", ("out",), ("output",)),
        CheckerFailure("Nodes in a graph must be topologically sorted"),
        ToleranceExceeded("B3-L17-padded", "output", 1e-3, 1e-5, 0.0, 100.0),
        RuntimeFailure("B1-L1", "bad input"),
        MissingOutput("B1-L1", "output", ("out",)),
    ]
    err = ExportValidationError(failures)
    assert err.failures == failures
    assert str(err) == (
        "export validation failed:\n"
        "  1 Softmax node(s) in the graph, expected 0\n"
        "  fused attention nodes [], expected exactly one com.microsoft.MultiHeadAttention\n"
        "  graph outputs ['out'], expected ['output']\n"
        "  onnx.checker: Nodes in a graph must be topologically sorted\n"
        "  B3-L17-padded: output max|diff| 0.001 exceeds atol 1e-05 + rtol 0*|eager| "
        "(100.00x the bound)\n"
        "  B1-L1: onnxruntime failed: bad input\n"
        "  B1-L1: no output named 'output' (outputs ['out'])"
    )
