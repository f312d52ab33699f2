"""The state of causal decoding: the projected keys and values of the tokens seen so far."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mha.model.config import AttentionConfig


# eq=False: dataclass equality would compare tensors elementwise and fail on bool().
@dataclass(frozen=True, eq=False)
class KVCache:
    """key = x W^K + b^K and value = x W^V + b^V of each sequence's P tokens so far.

    Args:
        key: (B, P, E) projected keys; P may be 0.
        value: (B, P, E) projected values.
    """

    key: Tensor
    value: Tensor

    def __post_init__(self) -> None:
        if self.key.dim() != 3 or self.key.shape != self.value.shape:
            raise ValueError(
                f"KVCache key and value must both be (B, P, E); got key "
                f"{tuple(self.key.shape)} and value {tuple(self.value.shape)}"
            )

    @classmethod
    def empty(
        cls,
        batch: int,
        config: AttentionConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """The cache of B sequences that have seen no token yet: (B, 0, E)."""
        rows = torch.empty(batch, 0, config.d_model, dtype=dtype, device=device)  # (B, 0, E)
        return cls(rows, rows.clone())

    @property
    def batch(self) -> int:
        """B, the number of sequences."""
        return int(self.key.shape[0])

    @property
    def length(self) -> int:
        """P, the number of tokens each sequence has seen."""
        return int(self.key.shape[1])

    def append(self, key: Tensor, value: Tensor) -> KVCache:
        """The cache grown by the projected rows (B, T, E) of T new tokens: (B, P + T, E)."""
        grown_key = torch.cat([self.key, key], dim=1)  # (B, P + T, E)
        return KVCache(grown_key, torch.cat([self.value, value], dim=1))
