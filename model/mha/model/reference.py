"""Plain reference attention: explicit matmul, mask, softmax. The test oracle."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def reference_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """Scaled dot-product attention with the project's fully-masked-row rule.

    Args:
        q: (B, h, L, d) queries.
        k: (B, h, S, d) keys.
        v: (B, h, S, d) values.
        allowed: (B, 1, L, S) bool, True where a query may attend a key.

    Returns:
        (B, h, L, d) attended values and (B, h, L, S) weights; rows with no allowed key
        are all zero in both.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, h, L, S)
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    weights = torch.where(allowed.any(-1, keepdim=True), weights, torch.zeros_like(weights))
    return weights @ v, weights
