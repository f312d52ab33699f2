"""The embedded default model: d_model 512, 8 heads, deterministic seeded weights."""

from __future__ import annotations

import math

import numpy as np
import torch

from mha.model.attention import MultiHeadAttention
from mha.model.config import AttentionConfig

DEFAULT_SEED = 0


def seeded_model(config: AttentionConfig, seed: int = DEFAULT_SEED) -> MultiHeadAttention:
    """Xavier-uniform weights and small biases from numpy's PCG64, the same on every machine.

    numpy's generator is used (not torch's) so the weights, and their sha256, do not depend
    on the torch version.
    """
    rng = np.random.default_rng(seed)
    module = MultiHeadAttention(config)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("weight"):
                fan_out, fan_in = tensor.shape
                bound = math.sqrt(6.0 / (fan_in + fan_out))
            else:  # non-zero biases so that every bias path is exercised
                bound = 0.1
            values = rng.uniform(-bound, bound, size=tuple(tensor.shape)).astype(np.float32)
            tensor.copy_(torch.from_numpy(values))
    return module.eval()


def default_model(seed: int = DEFAULT_SEED) -> MultiHeadAttention:
    """The embedded default: d_model 512, 8 heads."""
    return seeded_model(AttentionConfig(d_model=512, num_heads=8), seed)
