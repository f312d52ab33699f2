"""Export-time validation: graph structure and eager-vs-ONNX Runtime parity.

The same functions gate every export and back the parity tests, so they cannot drift apart.
Every failure is gathered (names, then structure, then values) as a typed
mha.export.failures object; the exporter raises them all as one ExportValidationError.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import torch

from mha import contract
from mha.export.cases import ParityCase
from mha.export.failures import (
    CheckerFailure,
    DtypeMismatch,
    FusedNodeInFallback,
    FusedNodeInMemory,
    FusedNodes,
    GraphNames,
    MissingOutput,
    NonFinite,
    RuntimeFailure,
    ShapeMismatch,
    SoftmaxCount,
    ToleranceExceeded,
    ValidationFailure,
)
from mha.export.onnx_graph import fused_nodes, op_counts
from mha.export.options import RTOL, TARGETS, TOLERANCE
from mha.model.attention import MultiHeadAttention


@dataclass
class OutputError:
    """Max errors of one output in one case, against the tolerance."""

    output: str
    max_abs: float
    max_rel: float  # max |diff| / max |eager|: scale-free, robust to near-zero entries
    atol: float
    rtol: float = 0.0
    worst: float = 0.0  # max of |diff| / (atol + rtol * |eager|): <= 1 passes

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs)) and self.worst <= 1.0


@dataclass
class CaseResult:
    """Parity of one case: the figures per output, and every failure found."""

    case_id: str
    errors: list[OutputError] = field(default_factory=list)
    failures: list[ValidationFailure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def describe(self) -> str:
        return "; ".join(str(f) for f in self.failures) or f"{self.case_id}: ok"


def name_failures(
    model: onnx.ModelProto, self_attention: bool, weights: bool
) -> list[ValidationFailure]:
    """Graph inputs and outputs against the tensor contract's names (mha.contract), in order."""
    inputs, outputs = contract.input_names(self_attention), contract.output_names(weights)
    return graph_name_failures(model, inputs, outputs)


def graph_name_failures(
    model: onnx.ModelProto, inputs: tuple[str, ...], outputs: tuple[str, ...]
) -> list[ValidationFailure]:
    """Graph inputs and outputs against the expected names, in order."""
    failures: list[ValidationFailure] = []
    for role, values, expected in (
        ("inputs", model.graph.input, inputs),
        ("outputs", model.graph.output, outputs),
    ):
        found = tuple(v.name for v in values)
        if found != expected:
            failures.append(GraphNames(role, found, expected))
    return failures


def check_structure(
    model: onnx.ModelProto, target: str, self_attention: bool, weights: bool
) -> list[ValidationFailure]:
    """Names, fused-node count and Softmax rule; an empty list when all is well."""
    failures = name_failures(model, self_attention, weights)
    allowed_softmax = 1 if weights and not TARGETS[target].keeps_fused_weights else 0
    return failures + fused_node_failures(model, target, allowed_softmax)


def check_step_structure(model: onnx.ModelProto, target: str) -> list[ValidationFailure]:
    """A KV-cache step graph's names (mha.contract.step_inputs/outputs) and fused-node rule."""
    inputs = tuple(t.name for t in contract.step_inputs())
    outputs = tuple(t.name for t in contract.step_outputs())
    failures = graph_name_failures(model, inputs, outputs)
    return failures + fused_node_failures(model, target, allowed_softmax=0)


def check_memory_step_structure(model: onnx.ModelProto, target: str) -> list[ValidationFailure]:
    """A memory export's step graph: names (mha.contract.memory_step_inputs/outputs) and the
    fused-node rule."""
    inputs = tuple(t.name for t in contract.memory_step_inputs())
    outputs = tuple(t.name for t in contract.memory_step_outputs())
    failures = graph_name_failures(model, inputs, outputs)
    return failures + fused_node_failures(model, target, allowed_softmax=0)


def check_memory_structure(model: onnx.ModelProto) -> list[ValidationFailure]:
    """memory.onnx: names (mha.contract.memory_projection_*), no attention node, no Softmax."""
    inputs = tuple(t.name for t in contract.memory_projection_inputs())
    outputs = tuple(t.name for t in contract.memory_projection_outputs())
    failures = graph_name_failures(model, inputs, outputs)
    fused = fused_nodes(model)
    if fused:
        failures.append(FusedNodeInMemory(tuple(f"{n.domain}.{n.op_type}" for n in fused)))
    softmax = op_counts(model).get("Softmax", 0)
    if softmax:
        failures.append(SoftmaxCount(softmax, 0))
    return failures


def fused_node_failures(
    model: onnx.ModelProto, target: str, allowed_softmax: int
) -> list[ValidationFailure]:
    """Exactly one node of the target's fused op and allowed_softmax Softmax nodes; none
    fused in the decomposed target."""
    fused = fused_nodes(model)
    if target == "none":
        return [FusedNodeInFallback(len(fused))] if fused else []
    failures: list[ValidationFailure] = []
    wanted = TARGETS[target].node
    names = tuple(f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in fused)
    if names != (wanted,):
        failures.append(FusedNodes(names, wanted))
    softmax = op_counts(model).get("Softmax", 0)
    if softmax != allowed_softmax:
        failures.append(SoftmaxCount(softmax, allowed_softmax))
    return failures


def check_onnx(model: onnx.ModelProto) -> list[ValidationFailure]:
    """onnx.checker and strict shape inference."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:  # onnx raises ValidationError / InferenceError
        return [CheckerFailure(str(err))]
    return []


def eager_outputs(
    module: MultiHeadAttention, feeds: dict[str, np.ndarray], self_attention: bool
) -> dict[str, np.ndarray]:
    """fp32 eager answers for the graph inputs (reference path, per-head weights)."""
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()}
    key = None if self_attention else t[contract.KEY].float()
    value = None if self_attention else t[contract.VALUE].float()
    with torch.no_grad():
        out, weights = module(
            t[contract.QUERY].float(),
            key,
            value,
            key_padding_mask=t[contract.KEY_PADDING_MASK],
            need_weights=True,
        )
    assert weights is not None
    return {contract.OUTPUT: out.numpy(), contract.ATTENTION_WEIGHTS: weights.numpy()}


def compare(
    output: str, got: np.ndarray, want: np.ndarray, atol: float, rtol: float = 0.0
) -> OutputError:
    """Max abs and scale-relative error of one output; NaN/shape problems count as inf."""
    inf = float("inf")
    if got.shape != want.shape:
        return OutputError(output, inf, inf, atol, rtol, inf)
    want64 = want.astype(np.float64)
    diff = np.abs(got.astype(np.float64) - want64)
    if not diff.size:
        return OutputError(output, 0.0, 0.0, atol, rtol, 0.0)
    if not np.isfinite(diff).all():
        return OutputError(output, inf, inf, atol, rtol, inf)
    max_abs = float(diff.max())
    worst = float((diff / (atol + rtol * np.abs(want64))).max())
    scale = float(np.abs(want64).max())
    return OutputError(output, max_abs, max_abs / scale if scale else max_abs, atol, rtol, worst)


def output_failure(
    case_id: str, error: OutputError, got: np.ndarray, want: np.ndarray, dtype: np.dtype
) -> ValidationFailure | None:
    """What is wrong with one output, most basic first: shape, dtype, non-finite, values."""
    if got.shape != want.shape:
        return ShapeMismatch(case_id, error.output, tuple(got.shape), tuple(want.shape))
    if got.dtype != dtype:
        return DtypeMismatch(case_id, error.output, str(got.dtype), str(dtype))
    if not np.isfinite(got).all():
        return NonFinite(case_id, error.output, int((~np.isfinite(got)).sum()))
    if not error.ok:
        return ToleranceExceeded(
            case_id, error.output, error.max_abs, error.atol, error.rtol, error.worst
        )
    return None


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of an export's floats: float32 for fp32, float16 for fp16."""
    return np.dtype(np.float16 if dtype == "fp16" else np.float32)


def reference_module(module: MultiHeadAttention, dtype: str) -> MultiHeadAttention:
    """The fp32 eager oracle of an export: the weights as the export stores them."""
    if dtype == "fp32":
        return module
    twin = copy.deepcopy(module)
    with torch.no_grad():
        for param in twin.parameters():
            param.copy_(param.to(torch.float16).to(torch.float32))
    return twin


def check_case(
    session: ort.InferenceSession,
    module: MultiHeadAttention,
    case: ParityCase,
    self_attention: bool,
    dtype: str,
) -> CaseResult:
    """Run one case through ONNX Runtime and fp32 eager, and compare every output.

    The oracle is fp32 eager on the weights as the export stores them (fp16-rounded for an
    fp16 export) and on the same inputs, so only the arithmetic is compared.
    """
    case_id = case.id(self_attention)
    feeds = case.inputs(module.config, self_attention)
    float_type = numpy_dtype(dtype)
    ort_feeds = {k: v.astype(float_type) if v.dtype != bool else v for k, v in feeds.items()}
    # eager sees the same (rounded) inputs that ORT sees, so only the math is compared
    eager_feeds = {k: v.astype(np.float32) if v.dtype != bool else v for k, v in ort_feeds.items()}
    names = tuple(o.name for o in session.get_outputs())
    expected = [n for n in contract.output_names(attention_weights=True) if n in names]
    if contract.OUTPUT not in names:
        return CaseResult(case_id, failures=[MissingOutput(case_id, contract.OUTPUT, names)])
    try:
        got = dict(zip(expected, session.run(expected, ort_feeds), strict=True))
    except Exception as err:  # ORT raises its own Fail/InvalidArgument types
        return CaseResult(case_id, failures=[RuntimeFailure(case_id, str(err))])
    want = eager_outputs(reference_module(module, dtype), eager_feeds, self_attention)
    return case_result(case_id, got, want, expected, dtype)


def case_result(
    case_id: str,
    got: dict[str, np.ndarray],
    want: dict[str, np.ndarray],
    names: Sequence[str],
    dtype: str,
) -> CaseResult:
    """Compare the named outputs of one case with eager's, within the dtype's tolerance."""
    float_type = numpy_dtype(dtype)
    errors = [compare(n, got[n], want[n], TOLERANCE[dtype], RTOL[dtype]) for n in names]
    found = (output_failure(case_id, e, got[e.output], want[e.output], float_type) for e in errors)
    return CaseResult(case_id, errors, [f for f in found if f is not None])


def check_parity(
    session: ort.InferenceSession,
    module: MultiHeadAttention,
    cases: list[ParityCase],
    self_attention: bool,
    dtype: str,
) -> list[CaseResult]:
    """check_case over every case."""
    return [check_case(session, module, c, self_attention, dtype) for c in cases]


def parity_failures(results: list[CaseResult]) -> list[ValidationFailure]:
    """Every failure of every case, in case order."""
    return [f for r in results for f in r.failures]


def max_errors(results: list[CaseResult]) -> tuple[dict[str, float], dict[str, float]]:
    """Per output: the max abs and max rel error over all cases."""
    abs_err: dict[str, float] = {}
    rel_err: dict[str, float] = {}
    for result in results:
        for e in result.errors:
            abs_err[e.output] = max(abs_err.get(e.output, 0.0), e.max_abs)
            rel_err[e.output] = max(rel_err.get(e.output, 0.0), e.max_rel)
    return abs_err, rel_err
