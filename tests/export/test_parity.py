"""Exported graph vs eager PyTorch on shapes other than the export shapes."""

from __future__ import annotations

import onnx
import pytest

from mha.export import ExportOptions
from mha.export.cases import ParityCase, parity_cases
from mha.export.exporter import cpu_session
from mha.export.onnx_graph import op_counts
from mha.export.options import TARGETS, unsupported
from mha.export.sources import load_source
from mha.export.validate import check_case, check_structure

KINDS = {  # id -> ExportOptions fields
    "self": {"self_attention": True},
    "cross": {"self_attention": False},
    "causal": {"self_attention": True, "causal": True},
    "self-weights": {"self_attention": True, "attention_weights": True},
    "cross-weights": {"self_attention": False, "attention_weights": True},
    "causal-weights": {"self_attention": True, "causal": True, "attention_weights": True},
}
EXTRA_CASES = [ParityCase(5, 3, 40, "padded"), ParityCase(2, 13, 13, "full")]


def matrix():
    for target in TARGETS:
        for dtype in ("fp32", "fp16"):
            for kind, fields in KINDS.items():
                if refused(target, dtype, fields):
                    continue
                cases = parity_cases(fields["self_attention"]) + EXTRA_CASES
                for case in cases:
                    case_id = f"{target}-{dtype}-{kind}-{case.id(fields['self_attention'])}"
                    yield pytest.param(target, dtype, fields, case, id=case_id)


def refused(target: str, dtype: str, fields: dict) -> str:
    """Why ExportOptions refuses this combination ("" = exported and tested)."""
    return unsupported(
        target, dtype, fields.get("causal", False), fields.get("attention_weights", False)
    )


@pytest.fixture(scope="module")
def sessions():
    return {}


def session_for(exported, sessions, target, dtype, fields):
    key = (target, dtype, tuple(sorted(fields.items())))
    if key not in sessions:
        folder = exported(target=target, dtype=dtype, **fields)
        sessions[key] = (
            cpu_session(str(folder / "model.onnx")),
            onnx.load(str(folder / "model.onnx")),
        )
    return sessions[key]


@pytest.mark.parametrize(("target", "dtype", "fields", "case"), list(matrix()))
def test_parity(exported, sessions, target, dtype, fields, case):
    session, _ = session_for(exported, sessions, target, dtype, fields)
    options = ExportOptions(d_model=64, num_heads=4, **fields)
    module = load_source(options, options.causal).module
    result = check_case(session, module, case, fields["self_attention"], dtype)
    assert result.ok, result.describe()
    assert {e.output for e in result.errors} == (
        {"output", "attention_weights"} if fields.get("attention_weights") else {"output"}
    )


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_graph_holds_exactly_one_fused_node(exported, sessions, target, kind):
    fields = KINDS[kind]
    _, model = session_for(exported, sessions, target, "fp32", fields)
    assert (
        check_structure(model, target, fields["self_attention"], "attention_weights" in fields)
        == []
    )
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    fused = [op for op in ops if op in {("", "Attention"), ("com.microsoft", "MultiHeadAttention")}]
    if target == "none":
        assert fused == [] and ("", "Softmax") in ops
        return
    domain, _, op_type = TARGETS[target].node.rpartition(".")
    assert fused == [(domain, op_type)]
    softmax = ops.count(("", "Softmax"))
    assert softmax == (1 if target == "ort" and "attention_weights" in fields else 0)


@pytest.mark.parametrize("target", ["ort", "onnx"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_fused_graph_zeroes_rows_from_the_padding_mask_alone(exported, sessions, target, kind):
    """No (B, 1, L, S) allowed-mask around the fused node: its causal part would show as
    Trilu/And, and a reduction of it over S as a second ReduceMax."""
    _, model = session_for(exported, sessions, target, "fp32", KINDS[kind])
    ops = op_counts(model)
    assert "Trilu" not in ops and "And" not in ops, ops
    assert ops.get("ReduceMax", 0) <= 1, ops
