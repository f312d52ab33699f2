"""Multi-head attention: MultiHead(Q, K, V) = Concat(head_1..head_h) W^O.

head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V), Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mha.model.config import AttentionConfig
from mha.model.reference import reference_attention


class MultiHeadAttention(nn.Module):
    """Multi-head attention with key padding mask, causal option and zero fully-masked rows.

    key_padding_mask follows torch.nn.MultiheadAttention: bool (B, S), True = ignore that key.
    A query row that may attend no key at all yields an all-zero output row (torch's own
    module yields NaN there).
    """

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__()
        self.config = config
        e = config.d_model
        self.q_proj = nn.Linear(e, e, bias=config.bias)
        self.k_proj = nn.Linear(config.key_dim, e, bias=config.bias)
        self.v_proj = nn.Linear(config.value_dim, e, bias=config.bias)
        self.out_proj = nn.Linear(e, e, bias=config.bias)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        use_reference: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend query (B, L, E) to key (B, S, kdim) / value (B, S, vdim).

        key and value default to query (self-attention). Returns the output (B, L, E) and,
        when need_weights, the per-head weights (B, h, L, S). use_reference selects the
        explicit matmul/softmax path instead of F.scaled_dot_product_attention.
        """
        key, value = self.resolve_inputs(query, key, value)
        q, k, v = self.project(query, key, value)
        allowed = self.allowed_mask(query.shape[1], key.shape[1], key_padding_mask, query)
        heads, weights = self.attend(q, k, v, allowed, need_weights or use_reference)
        out = self.out_proj(self.merge_heads(heads))
        return zero_masked_rows(out, allowed), weights if need_weights else None

    def resolve_inputs(
        self, query: Tensor, key: Tensor | None, value: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Fill in self-attention defaults and refuse causal cross-attention."""
        if key is None and value is not None:
            raise ValueError("value given without key; pass both or neither")
        if key is not None and self.config.causal:
            raise ValueError("causal=True is defined for self-attention only; got a key input")
        key = query if key is None else key
        return key, key if value is None else value

    def project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Apply W^Q, W^K, W^V: (B, L, E), (B, S, E), (B, S, E)."""
        return self.q_proj(query), self.k_proj(key), self.v_proj(value)

    def split_heads(self, x: Tensor) -> Tensor:
        """(B, T, E) -> (B, h, T, d)."""
        b, t, _ = x.shape
        return x.view(b, t, self.config.num_heads, self.config.head_dim).transpose(1, 2)

    def merge_heads(self, x: Tensor) -> Tensor:
        """(B, h, T, d) -> (B, T, E): Concat(head_1..head_h)."""
        b, _, t, _ = x.shape
        return x.transpose(1, 2).reshape(b, t, self.config.d_model)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, explicit: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Per-head attention on projected (B, T, E) tensors; weights only on the explicit path."""
        qh, kh, vh = self.split_heads(q), self.split_heads(k), self.split_heads(v)  # (B, h, T, d)
        if explicit:
            return reference_attention(qh, kh, vh, allowed)
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed), None

    def allowed_mask(
        self, length: int, source_length: int, key_padding_mask: Tensor | None, like: Tensor
    ) -> Tensor:
        """(B, 1, L, S) bool: True where query l may attend key s."""
        b = like.shape[0]
        if key_padding_mask is None:
            keep = torch.ones(b, source_length, dtype=torch.bool, device=like.device)
        else:
            check_mask(key_padding_mask, b, source_length)
            keep = ~key_padding_mask
        allowed = keep[:, None, None, :].expand(b, 1, length, source_length)
        if self.config.causal:
            causal = torch.ones(length, source_length, dtype=torch.bool, device=like.device)
            allowed = allowed & causal.tril()
        return allowed


def check_mask(mask: Tensor, batch: int, source_length: int) -> None:
    """Refuse a key_padding_mask that is not bool (B, S)."""
    if mask.dtype != torch.bool:
        raise ValueError(f"key_padding_mask must be bool (True = padding), got {mask.dtype}")
    if tuple(mask.shape) != (batch, source_length):
        raise ValueError(
            f"key_padding_mask shape {tuple(mask.shape)} does not match (B, S) = "
            f"({batch}, {source_length})"
        )


def zero_masked_rows(out: Tensor, allowed: Tensor) -> Tensor:
    """Zero the output rows (B, L, E) whose query may attend no key."""
    has_key = allowed.any(-1).transpose(1, 2)  # (B, L, 1)
    return torch.where(has_key, out, torch.zeros_like(out))
