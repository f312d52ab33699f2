"""Multi-head attention: MultiHead(Q, K, V) = Concat(head_1..head_h) W^O.

head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V), Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V.

`MultiHeadAttention.forward_with` is the block around an attention core (W^Q, W^K, W^V, the
core, W^O, zero rows with no key); eager runs it with `attend`, the export runs the same
method with the core swapped for one fused node (mha.export.graph).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mha.model.config import AttentionConfig
from mha.model.reference import reference_attention

# core(q (B, L, E), k (B, S, E), v (B, S, E), key_padding_mask (B, S) or None)
#   -> (heads merged back to (B, L, E), weights (B, h, L, S) or None)
AttentionCore = Callable[[Tensor, Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor | None]]


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
        if key_padding_mask is not None:
            check_mask(key_padding_mask, query.shape[0], key.shape[1])
        core = self.core(explicit=need_weights or use_reference)
        out, weights = self.forward_with(core, query, key, value, key_padding_mask)
        return out, weights if need_weights else None

    def forward_with(
        self,
        core: AttentionCore,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """The block around an attention core: W^Q, W^K, W^V, the core, W^O, zero empty rows.

        Returns the output (B, L, E) and the core's weights (B, h, L, S) or None; rows of
        queries that may attend no key are zero in both.
        """
        q = self.q_proj(query)  # (B, L, E)
        k, v = self.k_proj(key), self.v_proj(value)  # (B, S, E)
        heads, weights = core(q, k, v, key_padding_mask)  # (B, L, E), (B, h, L, S) or None
        out = self.out_proj(heads)  # (B, L, E)
        return zero_rows_without_keys(out, weights, key_padding_mask, self.config.causal)

    def core(self, explicit: bool) -> AttentionCore:
        """This block's eager attention core: the reference path if explicit, else SDPA."""
        cfg = self.config
        return functools.partial(
            attend, num_heads=cfg.num_heads, causal=cfg.causal, explicit=explicit
        )

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


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    num_heads: int,
    causal: bool,
    explicit: bool,
) -> tuple[Tensor, Tensor | None]:
    """The attention core: per-head attention of projected q (B, L, E) and k, v (B, S, E).

    Returns the heads merged back to (B, L, E) and, on the explicit (reference) path only,
    the weights (B, h, L, S). An export replaces this function by one fused node.
    """
    allowed = allowed_mask(q, k, key_padding_mask, causal)  # (B, 1, L, S)
    qh, kh, vh = (split_heads(x, num_heads) for x in (q, k, v))  # (B, h, L|S, d)
    if explicit:
        heads, weights = reference_attention(qh, kh, vh, allowed)
    else:
        heads, weights = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed), None
    return merge_heads(heads), weights


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, T, E) -> (B, h, T, d)."""
    b, t, e = x.shape
    return x.view(b, t, num_heads, e // num_heads).transpose(1, 2)  # (B, h, T, d)


def merge_heads(x: Tensor) -> Tensor:
    """(B, h, T, d) -> (B, T, E): Concat(head_1..head_h)."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)  # (B, T, E)


def allowed_mask(q: Tensor, k: Tensor, key_padding_mask: Tensor | None, causal: bool) -> Tensor:
    """(B, 1, L, S) bool: True where query l of q (B, L, E) may attend key s of k (B, S, E)."""
    (b, length, _), source_length = q.shape, k.shape[1]
    if key_padding_mask is None:
        keep = torch.ones(b, source_length, dtype=torch.bool, device=q.device)
    else:
        keep = ~key_padding_mask  # (B, S)
    allowed = keep[:, None, None, :].expand(b, 1, length, source_length)  # (B, 1, L, S)
    if causal:
        causal_mask = torch.ones(length, source_length, dtype=torch.bool, device=q.device)
        allowed = allowed & causal_mask.tril()
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


def rows_with_keys(key_padding_mask: Tensor, causal: bool) -> Tensor:
    """Query rows that may attend at least one key: (B, L, 1) when causal, else (B, 1, 1).

    Read from the (B, S) mask alone, never from a (B, 1, L, S) one, so that an exported
    graph around a fused attention node stays small.
    """
    keep = ~key_padding_mask  # (B, S)
    if causal:  # self-attention (S = L): row l sees keys 0..l
        return (torch.cumsum(keep.to(torch.int32), dim=1) > 0).unsqueeze(-1)  # (B, L, 1)
    return keep.any(dim=1, keepdim=True).unsqueeze(-1)  # (B, 1, 1), broadcasts over L


def zero_rows_without_keys(
    out: Tensor, weights: Tensor | None, key_padding_mask: Tensor | None, causal: bool
) -> tuple[Tensor, Tensor | None]:
    """Zero the output rows (B, L, E) and weight rows (B, h, L, S) of queries with no key."""
    if key_padding_mask is None:  # nothing padded: every query may attend key 0
        return out, weights
    rows = rows_with_keys(key_padding_mask, causal)  # (B, L|1, 1)
    out = torch.where(rows, out, torch.zeros_like(out))
    if weights is not None:
        weights = torch.where(rows.unsqueeze(1), weights, torch.zeros_like(weights))
    return out, weights
