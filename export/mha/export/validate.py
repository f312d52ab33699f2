"""Export-time validation: graph structure and eager-vs-ONNX Runtime parity.

The same functions gate every export and back the parity tests, so they cannot drift apart.
Every failure is gathered (names, then structure, then values) and raised as one error.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import torch

from mha.export.cases import ParityCase
from mha.export.onnx_graph import fused_nodes, op_counts
from mha.export.options import RTOL, TARGETS, TOLERANCE
from mha.model.attention import MultiHeadAttention


class ExportValidationError(Exception):
    """An export failed validation; `failures` lists every problem found."""

    def __init__(self, failures: list[str]) -> None:
        self.failures = failures
        super().__init__("export validation failed:\n  " + "\n  ".join(failures))


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
    """Parity of one case: an error per output, or a failure message."""

    case_id: str
    errors: list[OutputError] = field(default_factory=list)
    failure: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None and all(e.ok for e in self.errors)

    def describe(self) -> str:
        if self.failure:
            return f"{self.case_id}: {self.failure}"
        bad = [e for e in self.errors if not e.ok]
        return f"{self.case_id}: " + "; ".join(
            f"{e.output} max|diff| {e.max_abs:.3g} exceeds atol {e.atol:g} + rtol {e.rtol:g}"
            f"*|eager| ({e.worst:.2f}x the bound)"
            for e in bad
        )


def expected_io(self_attention: bool, weights: bool) -> tuple[list[str], list[str]]:
    """Input and output names of an export (ARCHITECTURE.md's tensor contract)."""
    inputs = ["query", "key_padding_mask"]
    if not self_attention:
        inputs = ["query", "key", "value", "key_padding_mask"]
    return inputs, ["output", "attention_weights"] if weights else ["output"]


def check_structure(
    model: onnx.ModelProto, target: str, self_attention: bool, weights: bool
) -> list[str]:
    """Names, fused-node count and Softmax rule; an empty list when all is well."""
    failures = []
    inputs, outputs = expected_io(self_attention, weights)
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != inputs:
        failures.append(f"graph inputs {got_in}, expected {inputs}")
    if got_out != outputs:
        failures.append(f"graph outputs {got_out}, expected {outputs}")
    counts = op_counts(model)
    fused = fused_nodes(model)
    softmax = counts.get("Softmax", 0)
    if target == "none":
        if fused:
            failures.append(f"target none has {len(fused)} fused attention node(s)")
        return failures
    wanted = TARGETS[target].node
    names = [f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in fused]
    if names != [wanted]:
        failures.append(f"fused attention nodes {names}, expected exactly one {wanted}")
    allowed_softmax = 1 if weights and not TARGETS[target].keeps_fused_weights else 0
    if softmax != allowed_softmax:
        failures.append(f"{softmax} Softmax node(s) in the graph, expected {allowed_softmax}")
    return failures


def check_onnx(model: onnx.ModelProto) -> list[str]:
    """onnx.checker and strict shape inference."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:  # onnx raises ValidationError / InferenceError
        return [f"onnx.checker: {err}"]
    return []


def eager_outputs(
    module: MultiHeadAttention, feeds: dict[str, np.ndarray], self_attention: bool
) -> dict[str, np.ndarray]:
    """fp32 eager answers for the graph inputs (reference path, per-head weights)."""
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()}
    key = None if self_attention else t["key"].float()
    value = None if self_attention else t["value"].float()
    with torch.no_grad():
        out, weights = module(
            t["query"].float(),
            key,
            value,
            key_padding_mask=t["key_padding_mask"],
            need_weights=True,
        )
    assert weights is not None
    return {"output": out.numpy(), "attention_weights": weights.numpy()}


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
    float_type = np.float16 if dtype == "fp16" else np.float32
    ort_feeds = {k: v.astype(float_type) if v.dtype != bool else v for k, v in feeds.items()}
    # eager sees the same (rounded) inputs that ORT sees, so only the math is compared
    eager_feeds = {k: v.astype(np.float32) if v.dtype != bool else v for k, v in ort_feeds.items()}
    names = [o.name for o in session.get_outputs()]
    expected = [n for n in ("output", "attention_weights") if n in names]
    if "output" not in names:
        return CaseResult(case_id, failure=f"no output named 'output' (outputs {names})")
    try:
        got = dict(zip(expected, session.run(expected, ort_feeds), strict=True))
    except Exception as err:  # ORT raises its own Fail/InvalidArgument types
        return CaseResult(case_id, failure=f"onnxruntime failed: {err}")
    want = eager_outputs(reference_module(module, dtype), eager_feeds, self_attention)
    errors = [compare(n, got[n], want[n], TOLERANCE[dtype], RTOL[dtype]) for n in expected]
    return CaseResult(case_id, errors)


def check_parity(
    session: ort.InferenceSession,
    module: MultiHeadAttention,
    cases: list[ParityCase],
    self_attention: bool,
    dtype: str,
) -> list[CaseResult]:
    """check_case over every case."""
    return [check_case(session, module, c, self_attention, dtype) for c in cases]


def parity_failures(results: list[CaseResult]) -> list[str]:
    """One line per failed case."""
    return [r.describe() for r in results if not r.ok]


def max_errors(results: list[CaseResult]) -> tuple[dict[str, float], dict[str, float]]:
    """Per output: the max abs and max rel error over all cases."""
    abs_err: dict[str, float] = {}
    rel_err: dict[str, float] = {}
    for result in results:
        for e in result.errors:
            abs_err[e.output] = max(abs_err.get(e.output, 0.0), e.max_abs)
            rel_err[e.output] = max(rel_err.get(e.output, 0.0), e.max_rel)
    return abs_err, rel_err
