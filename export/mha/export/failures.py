"""Typed validation failures: one frozen dataclass per kind, and the error that carries them.

Each kind keeps its figures as fields (for tests and tools) and its `str()` is the line a
person reads in `mha export`'s output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class ValidationFailure:
    """One problem an export's validation found; str() is its message."""


# Structure: graph names, the fused node, Softmax nodes, onnx.checker.


@dataclass(frozen=True)
class GraphNames(ValidationFailure):
    """Graph inputs or outputs other than the tensor contract's, in its order."""

    role: str  # "inputs" or "outputs"
    found: tuple[str, ...]
    expected: tuple[str, ...]

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(n for n in self.expected if n not in self.found)

    @property
    def extra(self) -> tuple[str, ...]:
        return tuple(n for n in self.found if n not in self.expected)

    def __str__(self) -> str:
        return f"graph {self.role} {list(self.found)}, expected {list(self.expected)}"


@dataclass(frozen=True)
class FusedNodes(ValidationFailure):
    """A fused target whose graph holds other than exactly one node of its fused op."""

    found: tuple[str, ...]  # "domain.OpType" of every fused attention node in the graph
    expected: str  # the target's node, "domain.OpType"

    def __str__(self) -> str:
        return f"fused attention nodes {list(self.found)}, expected exactly one {self.expected}"


@dataclass(frozen=True)
class FusedNodeInFallback(ValidationFailure):
    """The decomposed target (`none`) with fused attention nodes in its graph."""

    count: int

    def __str__(self) -> str:
        return f"target none has {self.count} fused attention node(s)"


@dataclass(frozen=True)
class FusedNodeInMemory(ValidationFailure):
    """A memory export's memory.onnx (projections only) with attention nodes in it."""

    found: tuple[str, ...]  # "domain.OpType" of every fused attention node in memory.onnx

    def __str__(self) -> str:
        return f"memory.onnx has attention node(s) {list(self.found)}, expected none"


@dataclass(frozen=True)
class SoftmaxCount(ValidationFailure):
    """More or fewer Softmax nodes than the target allows (a decomposed fallback shows here)."""

    found: int
    expected: int

    def __str__(self) -> str:
        return f"{self.found} Softmax node(s) in the graph, expected {self.expected}"


@dataclass(frozen=True)
class CheckerFailure(ValidationFailure):
    """onnx.checker (full check, strict shape inference) refused the model."""

    message: str

    def __str__(self) -> str:
        return f"onnx.checker: {self.message}"


# Parity of one case: the run itself, then each output's shape, dtype and values.


@dataclass(frozen=True)
class MissingOutput(ValidationFailure):
    """The session has no output of the name a case reads."""

    case_id: str
    output: str
    outputs: tuple[str, ...]  # the session's outputs

    def __str__(self) -> str:
        return f"{self.case_id}: no output named {self.output!r} (outputs {list(self.outputs)})"


@dataclass(frozen=True)
class RuntimeFailure(ValidationFailure):
    """ONNX Runtime raised while running a case."""

    case_id: str
    message: str

    def __str__(self) -> str:
        return f"{self.case_id}: onnxruntime failed: {self.message}"


@dataclass(frozen=True)
class ShapeMismatch(ValidationFailure):
    """An output whose shape differs from eager PyTorch's."""

    case_id: str
    output: str
    found: tuple[int, ...]
    expected: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.case_id}: {self.output} shape {self.found}, expected {self.expected}"


@dataclass(frozen=True)
class DtypeMismatch(ValidationFailure):
    """An output of another dtype than the export's (float32 for fp32, float16 for fp16)."""

    case_id: str
    output: str
    found: str
    expected: str

    def __str__(self) -> str:
        return f"{self.case_id}: {self.output} dtype {self.found}, expected {self.expected}"


@dataclass(frozen=True)
class NonFinite(ValidationFailure):
    """An output holding NaN or infinite values (eager PyTorch's never do)."""

    case_id: str
    output: str
    count: int

    def __str__(self) -> str:
        return f"{self.case_id}: {self.output} has {self.count} NaN or infinite value(s)"


@dataclass(frozen=True)
class ToleranceExceeded(ValidationFailure):
    """An output farther from eager than |diff| <= atol + rtol * |eager| allows somewhere."""

    case_id: str
    output: str
    max_abs: float
    atol: float
    rtol: float
    worst: float  # max of |diff| / (atol + rtol * |eager|); > 1 here

    def __str__(self) -> str:
        return (
            f"{self.case_id}: {self.output} max|diff| {self.max_abs:.3g} exceeds atol "
            f"{self.atol:g} + rtol {self.rtol:g}*|eager| ({self.worst:.2f}x the bound)"
        )


class ExportValidationError(Exception):
    """An export failed validation; `failures` lists every problem found."""

    def __init__(self, failures: Sequence[ValidationFailure]) -> None:
        self.failures = list(failures)
        lines = "\n  ".join(str(f) for f in self.failures)
        super().__init__(f"export validation failed:\n  {lines}")
