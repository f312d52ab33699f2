"""Logging that says nothing to our users, filtered precisely (never all warnings)."""

from __future__ import annotations

import logging

# The logger of torch/onnx/_internal/exporter/_registration.py. Quieting "torch.onnx" by
# level does not hold: importing torch resets its loggers' levels.
REGISTRY_LOGGER = "torch.onnx._internal.exporter._registration"


class TorchvisionNotice(logging.Filter):
    """Drops torch.onnx's "torchvision is not installed. Skipping torchvision::nms" (and
    roi_align, roi_pool, deform_conv2d): its op registry logs one per torchvision op it
    cannot register, at every export, though no attention graph uses them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("torchvision is not installed")


def drop_torchvision_notices() -> None:
    """Install the filter on the registry's logger, once."""
    registry = logging.getLogger(REGISTRY_LOGGER)
    if not any(isinstance(f, TorchvisionNotice) for f in registry.filters):
        registry.addFilter(TorchvisionNotice())
