"""torch.onnx's ATen -> ONNX registry, built once per process and copied for each export.

`torch.onnx.export(dynamo=True)` rebuilds its registry from onnxscript's torchlib on every
call: about 1 s of CPU on this kind of machine, a fifth to a third of exporting one of our
models, and twice that for a memory export (two traces). Under `reused()`, the registry is
built once per opset and each export gets a copy: its own dict of lists, so the custom
translations an export registers (our fused node) go into the copy, never into the base.

The registry is torch's private class (torch.onnx._internal.exporter._registration); torch
is pinned by the `export` extra. If the class does not look as this module expects, `reused()`
leaves it alone and exports rebuild the registry as before.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Iterator
from typing import Any

from torch.onnx._internal.exporter import _registration

__all__ = ["reused"]

_lock = threading.Lock()
_bases: dict[tuple[type, int], Any] = {}


def _copy(base: Any) -> Any:
    """A registry equal to `base` whose function lists can grow without touching base's."""
    registry = object.__new__(type(base))
    registry.__dict__.update(base.__dict__)
    registry.functions = {target: list(metas) for target, metas in base.functions.items()}
    return registry


@contextlib.contextmanager
def reused() -> Iterator[None]:
    """Within the block, ONNXRegistry.from_torchlib hands out copies of one built registry."""
    cls: Any = getattr(_registration, "ONNXRegistry", None)
    original = vars(cls).get("from_torchlib") if cls is not None else None
    if cls is None or not isinstance(original, classmethod):
        yield
        return
    build = original.__func__
    default_opset = inspect.signature(build).parameters["opset_version"].default

    def from_torchlib(klass: type, opset_version: int = default_opset) -> Any:
        with _lock:
            key = (klass, opset_version)
            if key not in _bases:
                base = build(klass, opset_version)
                if not isinstance(getattr(base, "functions", None), dict):
                    return base  # not the registry this module knows: no reuse
                _bases[key] = base
            return _copy(_bases[key])

    with _lock:
        cls.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        with _lock:
            cls.from_torchlib = original
