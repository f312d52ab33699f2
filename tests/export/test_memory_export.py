"""Cross-attention memory exports (--cross --kv-cache): memory.onnx and the step over it."""

from __future__ import annotations

import json

import onnx
import onnxruntime as ort
import pytest
import torch
from commands import mha_in_process
from onnx import numpy_helper

from mha import contract
from mha.export import ExportOptions
from mha.export.exporter import cpu_session
from mha.export.failures import FusedNodeInMemory, GraphNames, ToleranceExceeded
from mha.export.graph import MemoryStepGraph
from mha.export.memory_cases import MemoryCase, RaggedMemoryCase, memory_cases
from mha.export.onnx_graph import fused_nodes, op_counts
from mha.export.options import TARGETS
from mha.export.sources import load_source
from mha.export.validate import check_memory_step_structure, check_memory_structure, parity_failures
from mha.export.validate_memory import MemorySessions, check_memory
from mha.model import AttentionConfig, seeded_model

KDIM, VDIM = 48, 80
# Other shapes than the export-time cases: S = 2, 17, 40; T = 3, 5; B = 1 and 4.
CASES = [
    MemoryCase(4, 3, 2, "padded"),
    MemoryCase(1, 5, 17),
    MemoryCase(2, 3, 40, "full"),
    RaggedMemoryCase(sources=(2, 17, 0, 9), new=(3, 1, 2, 5)),
]
EXPORTS = [("ort", "fp32"), ("ort", "fp16"), ("onnx", "fp32"), ("onnx", "fp16"), ("none", "fp32")]


def memory_export(exported, target: str, dtype: str, **fields):
    return exported(
        target=target, dtype=dtype, self_attention=False, kv_cache=True, kdim=KDIM, vdim=VDIM,
        **fields,
    )  # fmt: skip


@pytest.fixture(scope="module")
def module():
    options = ExportOptions(d_model=64, num_heads=4, kdim=KDIM, vdim=VDIM, self_attention=False)
    return load_source(options, False).module


def session_of(model: onnx.ModelProto | str) -> ort.InferenceSession:
    return cpu_session(model if isinstance(model, str) else model.SerializeToString())


def sessions_of(folder, memory: onnx.ModelProto | None = None, cross=None) -> MemorySessions:
    memory_session = session_of(memory or str(folder / "memory.onnx"))
    return MemorySessions(memory_session, session_of(str(folder / "model.onnx")), cross)


@pytest.mark.parametrize(("target", "dtype"), EXPORTS, ids=["-".join(e) for e in EXPORTS])
def test_memory_parity_on_other_shapes(exported, module, target, dtype):
    folder = memory_export(exported, target, dtype)
    results = check_memory(sessions_of(folder), module, dtype, CASES)
    assert [r.case_id for r in results] == [
        "memory-B4-S2-T3-padded",
        "memory-B1-S17-T5",
        "memory-B2-S40-T3-full",
        "memory-ragged-B4-empty",
    ]
    assert parity_failures(results) == [], [r.describe() for r in results]
    assert all({e.output for e in r.errors} == {"output", "memory_key", "memory_value"}
               for r in results)  # fmt: skip


def test_the_step_agrees_with_the_stateless_cross_export_of_the_same_weights(exported, module):
    folder = memory_export(exported, "ort", "fp16")
    cross = session_of(str(exported(target="ort", dtype="fp16", self_attention=False,
                                    kdim=KDIM, vdim=VDIM) / "model.onnx"))  # fmt: skip
    results = check_memory(sessions_of(folder, cross=cross), module, "fp16", CASES)
    against_cross = [r for r in results if r.case_id.endswith("-vs-cross")]
    assert [r.case_id for r in against_cross] == [
        f"{c.id()}-vs-cross" for c in CASES if isinstance(c, MemoryCase)
    ]
    assert parity_failures(results) == [], [r.describe() for r in results]


@pytest.mark.parametrize(("target", "dtype"), EXPORTS, ids=["-".join(e) for e in EXPORTS])
def test_memory_graph_projects_and_the_step_holds_one_fused_node(exported, target, dtype):
    folder = memory_export(exported, target, dtype)
    memory, step = (onnx.load(str(folder / f)) for f in ("memory.onnx", "model.onnx"))
    assert check_memory_structure(memory) == [] and check_memory_step_structure(step, target) == []
    assert fused_nodes(memory) == [] and "Softmax" not in op_counts(memory)
    assert [i.name for i in memory.graph.input] == ["key", "value"]
    assert [o.name for o in memory.graph.output] == ["memory_key", "memory_value"]
    assert [i.name for i in step.graph.input] == [
        "query", "memory_key", "memory_value", "key_padding_mask"
    ]  # fmt: skip
    assert [o.name for o in step.graph.output] == ["output"]
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*step.graph.input, *memory.graph.input]}  # fmt: skip
    assert dims["key_padding_mask"] == ["B", "S"] and dims["key"] == ["B", "S", KDIM]
    ops, fused = op_counts(step), fused_nodes(step)
    if target == "none":
        assert fused == [] and ops["Softmax"] == 1
        return
    [node] = fused
    assert f"{node.domain}.{node.op_type}".lstrip(".") == TARGETS[target].node
    assert "Softmax" not in ops and "Trilu" not in ops
    graph_inputs = {i.name for i in step.graph.input}
    assert {"memory_key", "memory_value"} <= set(node.input) & graph_inputs  # fed as given


def test_mha_json_declares_requests_the_step_and_the_memory_graph(exported):
    folder = memory_export(exported, "ort", "fp16")
    config = json.loads((folder / "mha.json").read_text())
    assert (config["format"], config["causal"], config["self_attention"]) == (1, False, False)
    assert config["inputs"] == [
        {"name": "query", "datatype": "FP16", "shape": [1, -1, 64]},
        {"name": "key", "datatype": "FP16", "shape": [1, -1, KDIM]},
        {"name": "value", "datatype": "FP16", "shape": [1, -1, VDIM]},
        {"name": "key_padding_mask", "datatype": "BOOL", "shape": [1, -1], "optional": True},
    ]
    assert config["outputs"] == [{"name": "output", "datatype": "FP16", "shape": [1, -1, 64]}]
    sequence = config["sequence"]
    assert sequence == contract.memory_sequence_json(
        contract.Dims(64, 4, KDIM, VDIM), "FP16", config["max_sequence_length"]
    )
    assert sequence["kind"] == contract.MEMORY_KIND == "cross_attention_memory"
    assert sequence["graph_inputs"][3] == {
        "name": "key_padding_mask", "datatype": "BOOL", "shape": [-1, -1]
    }  # fmt: skip
    assert sequence["memory"]["file"] == "memory.onnx"
    assert [t["shape"] for t in sequence["memory"]["graph_inputs"]] == [
        [-1, -1, KDIM], [-1, -1, VDIM]
    ]  # fmt: skip
    assert sequence["cache"] == {
        "tensors": ["memory_key", "memory_value"],
        "layout": "[B, S, E]",
        "bytes_per_token": 2 * 64 * 2,
    }
    assert config["parity"]["cases"] == [c.id if isinstance(c, RaggedMemoryCase) else c.id()
                                         for c in memory_cases()] + [
        f"{c.id()}-vs-cross" for c in memory_cases() if isinstance(c, MemoryCase)
    ]  # fmt: skip
    assert sorted(p.name for p in folder.iterdir()) == ["memory.onnx", "mha.json", "model.onnx"]


def test_a_wrong_key_projection_in_memory_onnx_fails_every_case(exported, module):
    folder = memory_export(exported, "ort", "fp32")
    memory = onnx.load(str(folder / "memory.onnx"))
    [bias] = [t for t in memory.graph.initializer if t.name == "mha.k_proj.bias"]
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 1e-3, bias.name))
    results = check_memory(sessions_of(folder, memory), module, "fp32")
    failures = parity_failures(results)
    assert all(isinstance(f, ToleranceExceeded) for f in failures)
    wrong_keys = [f for f in failures if f.output == "memory_key"]
    assert len(wrong_keys) == len(memory_cases())
    assert all(f.max_abs == pytest.approx(1e-3, abs=5e-6) for f in wrong_keys)


def test_an_attention_graph_fails_as_memory_onnx(exported):
    model = onnx.load(str(exported(target="ort", self_attention=False) / "model.onnx"))
    inputs, outputs, attention = check_memory_structure(model)
    assert isinstance(inputs, GraphNames) and inputs.extra == ("query", "key_padding_mask")
    assert isinstance(outputs, GraphNames) and outputs.missing == ("memory_key", "memory_value")
    assert attention == FusedNodeInMemory(("com.microsoft.MultiHeadAttention",))
    assert "memory.onnx has attention node(s)" in str(attention)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-op", "reference-core"])
def test_memory_step_graph_run_eagerly_is_the_model(fused):
    module = seeded_model(AttentionConfig(32, 4, kdim=16, vdim=24))
    query, key, value = torch.randn(3, 2, 32), torch.randn(3, 5, 16), torch.randn(3, 5, 24)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[1, 3:], mask[2] = True, True  # padded memory; all padding: zero rows
    graph = MemoryStepGraph(module, fused).eval()
    with torch.no_grad():
        memory = module.project_memory(key, value)
        got = graph(query, memory.key, memory.value, mask)
        want, _ = module(query, key, value, mask, use_reference=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.count_nonzero(got[2]) == 0


def test_cross_kv_cache_refuses_causal(tmp_path):
    with pytest.raises(ValueError, match="cannot be --causal"):
        ExportOptions(kv_cache=True, self_attention=False, causal=True)


def test_cli_exports_cross_kv_cache(tmp_path, capsys):
    proc = mha_in_process(
        capsys, "export", "--repository", tmp_path, "--name", "x", "--kv-cache", "--cross",
        "--d-model", 32, "--num-heads", 2, "--kdim", 16, "--max-sequence-length", 512,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "cross kv-cache" in proc.stdout and "memory-ragged-B2-empty" in proc.stdout
    config = json.loads((tmp_path / "x" / "1" / "mha.json").read_text())
    assert config["sequence"]["max_context"] == 512 and config["kdim"] == 16
    for graph in ("model.onnx", "memory.onnx"):  # each graph says what it was exported as
        metadata = onnx.load(str(tmp_path / "x" / "1" / graph)).metadata_props
        assert json.loads({p.key: p.value for p in metadata}["mha.config"]) == config, graph


def test_a_failed_memory_export_writes_nothing(exported, module, tmp_path):
    from mha.export.exporter import StepTimer, install_validated
    from mha.export.failures import ExportValidationError, SoftmaxCount
    from mha.export.sources import from_module

    folder = memory_export(exported, "ort", "fp32")
    step, memory = (onnx.load(str(folder / f)) for f in ("model.onnx", "memory.onnx"))
    options = ExportOptions(repository=tmp_path, d_model=64, num_heads=4, kdim=KDIM, vdim=VDIM,
                            self_attention=False, kv_cache=True)  # fmt: skip
    failure = SoftmaxCount(1, 0)
    with pytest.raises(ExportValidationError) as err:
        install_validated(step, options, from_module(module, False), [failure], StepTimer(
            lambda _: None), memory)  # fmt: skip
    assert err.value.failures == [failure]  # and parity itself passed
    assert not any(tmp_path.rglob("*.onnx")) and not options.model_dir.exists()
