"""ONNX export with one fused attention node, and its parity validation."""

from mha.export.failures import ExportValidationError
from mha.export.options import TARGETS, TOLERANCE, ExportOptions


def export_model(*args, **kwargs):
    """Lazy wrapper of mha.export.exporter.export_model (which imports torch)."""
    from mha.export.exporter import export_model as run

    return run(*args, **kwargs)


__all__ = ["TARGETS", "TOLERANCE", "ExportOptions", "ExportValidationError", "export_model"]
