"""Configuration of a multi-head attention block."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionConfig:
    """Shape and options of one multi-head attention block.

    kdim/vdim follow torch.nn.MultiheadAttention: the feature sizes of key and value inputs
    in cross-attention (None = d_model).
    """

    d_model: int = 512
    num_heads: int = 8
    kdim: int | None = None
    vdim: int | None = None
    bias: bool = True
    # Causal masking is defined for self-attention only: with L != S there is no single
    # convention for which keys a query may see, so we refuse instead of guessing.
    causal: bool = False

    def __post_init__(self) -> None:
        for name in ("d_model", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("kdim", "vdim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}"
            )

    @property
    def head_dim(self) -> int:
        """d_k = d_model / h."""
        return self.d_model // self.num_heads

    @property
    def key_dim(self) -> int:
        """Feature size of the key input."""
        return self.kdim if self.kdim is not None else self.d_model

    @property
    def value_dim(self) -> int:
        """Feature size of the value input."""
        return self.vdim if self.vdim is not None else self.d_model

    @property
    def same_kv_dims(self) -> bool:
        """True when key and value have d_model features (torch packs in_proj then)."""
        return self.key_dim == self.d_model and self.value_dim == self.d_model
