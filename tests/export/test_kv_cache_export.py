"""KV-cache exports: the step graph decodes like the full causal forward, in every target."""

from __future__ import annotations

import json

import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from mha import contract
from mha.export import ExportOptions
from mha.export.decode_cases import DecodeCase, RaggedCase, decoding_cases
from mha.export.exporter import cpu_session
from mha.export.failures import GraphNames, RuntimeFailure, ToleranceExceeded
from mha.export.graph import StepGraph
from mha.export.onnx_graph import fused_nodes, op_counts
from mha.export.options import TARGETS
from mha.export.sources import load_source
from mha.export.validate import check_step_structure, parity_failures
from mha.export.validate_step import check_decoding
from mha.model import AttentionConfig, KVCache, seeded_model

# Other shapes than the export-time cases: batch 3, P = 2 and 17, a 5-token chunk, ragged
# steps with an all-padding sequence and one with new tokens but no past.
CASES = [
    DecodeCase(2, steps=2, chunk=3, batch=3),
    DecodeCase(17, steps=1, chunk=5, batch=1),
    RaggedCase(past=(3, 11, 0, 6), new=(2, 1, 4, 1)),
    RaggedCase(past=(0, 0, 7), new=(0, 2, 1)),
]
DTYPES = ("fp32", "fp16")


def kv_export(exported, target: str, dtype: str):
    """The version folder of a KV-cache export (fp32 without a dtype field: the service
    tests export the same options, and the session fixture exports each set once)."""
    fields = {"target": target, "kv_cache": True}
    return exported(**fields, **({"dtype": dtype} if dtype != "fp32" else {}))


@pytest.fixture(scope="module")
def module():
    return load_source(ExportOptions(d_model=64, num_heads=4, kv_cache=True), True).module


def session_of(model: onnx.ModelProto | str) -> ort.InferenceSession:
    return cpu_session(model if isinstance(model, str) else model.SerializeToString())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", list(TARGETS))
def test_decoding_parity_on_other_shapes(exported, module, target, dtype):
    session = session_of(str(kv_export(exported, target, dtype) / "model.onnx"))
    results = check_decoding(session, module, dtype, CASES)
    assert [r.case_id for r in results] == [
        "decode-P2-steps2-T3",
        "decode-P17-steps1-T5",
        "ragged-B4",
        "ragged-B3-empty",
    ]
    assert parity_failures(results) == [], [r.describe() for r in results]
    assert all({e.output for e in r.errors} == {"output", "new_key", "new_value"} for r in results)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", list(TARGETS))
def test_step_graph_holds_exactly_one_fused_node(exported, target, dtype):
    model = onnx.load(str(kv_export(exported, target, dtype) / "model.onnx"))
    assert check_step_structure(model, target) == []
    assert [i.name for i in model.graph.input] == [
        "query", "past_key", "past_value", "key_padding_mask"
    ]  # fmt: skip
    assert [o.name for o in model.graph.output] == ["output", "new_key", "new_value"]
    mask = model.graph.input[3].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in mask] == ["B", "C"]
    ops, fused = op_counts(model), fused_nodes(model)
    if target == "none":
        assert fused == [] and ops["Softmax"] == 1
        return
    [node] = fused
    assert f"{node.domain}.{node.op_type}".lstrip(".") == TARGETS[target].node
    assert "Softmax" not in ops and "Trilu" not in ops  # the causal offset is built, not tril'd
    assert list(node.output) == [node.output[0]]  # no present or qk output to compute
    producers = {name: n.op_type for n in model.graph.node for name in n.output}
    computes_in_fp32 = target == "onnx" and dtype == "fp16"  # options.STEP_FEEDS
    assert all(producers[name] == "Cast" for name in node.input[:3]) is computes_in_fp32


def test_mha_json_declares_the_request_and_the_step_graph(exported):
    folder = kv_export(exported, "ort", "fp16")
    config = json.loads((folder / "mha.json").read_text())
    assert (config["format"], config["causal"], config["self_attention"]) == (1, True, True)
    assert config["inputs"] == [{"name": "query", "datatype": "FP16", "shape": [1, -1, 64]}]
    assert config["outputs"] == [{"name": "output", "datatype": "FP16", "shape": [1, -1, 64]}]
    sequence = config["sequence"]
    assert sequence["kind"] == contract.SEQUENCE_KIND == "causal_self_attention"
    assert sequence["max_context"] == config["max_sequence_length"] == 4096
    assert sequence["graph_inputs"][3] == {
        "name": "key_padding_mask", "datatype": "BOOL", "shape": [-1, -1]
    }  # fmt: skip
    assert [t["shape"] for t in sequence["graph_inputs"][:3]] == [[-1, -1, 64]] * 3
    assert [t["name"] for t in sequence["graph_outputs"]] == ["output", "new_key", "new_value"]
    assert {t["datatype"] for t in sequence["graph_outputs"]} == {"FP16"}
    assert sequence["cache"] == {
        "tensors": ["past_key", "past_value"],
        "appended_from": ["new_key", "new_value"],
        "layout": "[B, P, E]",
        "bytes_per_token": 2 * 64 * 2,
    }
    assert config["parity"]["cases"] == [c.id for c in decoding_cases()]
    assert set(config["parity"]["max_abs_error"]) == {"output", "new_key", "new_value"}
    model = onnx.load(str(folder / "model.onnx"))
    assert json.loads({p.key: p.value for p in model.metadata_props}["mha.config"]) == config


def test_a_wrong_key_projection_fails_every_case_with_figures(exported, module):
    model = onnx.load(str(kv_export(exported, "ort", "fp32") / "model.onnx"))
    [bias] = [t for t in model.graph.initializer if t.name == "mha.k_proj.bias"]
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 1e-3, bias.name))
    results = check_decoding(session_of(model), module, "fp32")
    failures = parity_failures(results)
    assert all(isinstance(f, ToleranceExceeded) for f in failures)
    wrong_keys = [f for f in failures if f.output == "new_key"]
    assert [f.case_id for f in wrong_keys] == [c.id for c in decoding_cases()]
    assert all(f.max_abs == pytest.approx(1e-3, abs=5e-6) for f in wrong_keys)


def test_a_causal_mask_off_by_one_is_caught(exported, module):
    """Queries that cannot see their own token: the mask's LessOrEqual made Less."""
    model = onnx.load(str(kv_export(exported, "onnx", "fp32") / "model.onnx"))
    [node] = [n for n in model.graph.node if n.op_type == "LessOrEqual"]
    node.op_type = "Less"
    results = check_decoding(session_of(model), module, "fp32")
    assert {f.case_id for f in parity_failures(results)} == {c.id for c in decoding_cases()}


def test_a_full_sequence_graph_fails_as_a_step_graph(exported, module):
    model = onnx.load(str(exported(target="ort") / "model.onnx"))
    inputs, outputs = check_step_structure(model, "ort")
    assert isinstance(inputs, GraphNames) and inputs.missing == ("past_key", "past_value")
    assert isinstance(outputs, GraphNames) and outputs.missing == ("new_key", "new_value")
    [result] = check_decoding(session_of(model), module, "fp32", [DecodeCase(1)])
    [failure] = result.failures
    assert isinstance(failure, RuntimeFailure) and failure.case_id == "decode-P1-steps3-T4"


@pytest.mark.parametrize("fused", [True, False], ids=["fused-op", "reference-core"])
def test_step_graph_run_eagerly_is_the_model(fused):
    module = seeded_model(AttentionConfig(32, 4, causal=True))
    query, past = torch.randn(3, 2, 32), KVCache(torch.randn(3, 5, 32), torch.randn(3, 5, 32))
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[1, 3:5], mask[1, 6] = True, True  # past of 3, one new token of 2
    mask[2] = True  # all padding: zero rows
    graph = StepGraph(module, fused).eval()
    with torch.no_grad():
        got = graph(query, past.key, past.value, mask)
        want = module.step_with(module.step_core(explicit=True), query, past, mask)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert torch.count_nonzero(got[0][2]) == 0
    assert graph.input_names() == ["query", "past_key", "past_value", "key_padding_mask"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"attention_weights": True}, "no attention_weights output"),
        ({"attention_weights": True, "self_attention": False}, "no attention_weights output"),
    ],
    ids=["weights", "cross-weights"],
)
def test_what_a_step_graph_cannot_be_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        ExportOptions(kv_cache=True, **fields)
    assert ExportOptions(kv_cache=True).causal is True  # a KV cache implies causal
    cross = ExportOptions(kv_cache=True, self_attention=False)  # a memory export: not causal
    assert (cross.causal, cross.memory) == (False, True)
