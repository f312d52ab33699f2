"""The module that is traced: projections, the fused op, W^O, zero fully-masked rows."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mha.export import fused_ops  # noqa: F401  (registers torch.ops.mha.attention)
from mha.model.attention import MultiHeadAttention


def rows_with_keys(key_padding_mask: Tensor, causal: bool) -> Tensor:
    """(B, L, 1) bool: query rows that may attend at least one key."""
    keep = ~key_padding_mask  # (B, S)
    if causal:  # self-attention: row l sees keys 0..l
        return (torch.cumsum(keep.to(torch.int32), dim=1) > 0).unsqueeze(-1)
    return keep.any(dim=1, keepdim=True).unsqueeze(-1)  # (B, 1, 1), broadcasts over L


class ExportGraph(nn.Module):
    """The exported graph's forward, with ARCHITECTURE.md's input and output names.

    fused=True routes attention through torch.ops.mha.attention (one fused node after
    translation); fused=False keeps the explicit reference math (the `none` target).
    """

    def __init__(
        self, mha: MultiHeadAttention, self_attention: bool, weights: bool, fused: bool
    ) -> None:
        super().__init__()
        self.mha = mha
        self.self_attention = self_attention
        self.weights = weights
        self.fused = fused

    def compute(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor
    ) -> tuple[Tensor, ...]:
        """(output,) or (output, attention_weights)."""
        q, k, v = self.mha.project(query, key, value)
        heads, weights = self.attend(q, k, v, key_padding_mask)
        out = self.mha.out_proj(heads)
        rows = rows_with_keys(key_padding_mask, self.mha.config.causal)
        out = torch.where(rows, out, torch.zeros_like(out))
        if not self.weights or weights is None:
            return (out,)
        weights = torch.where(rows.unsqueeze(1), weights, torch.zeros_like(weights))
        return out, weights

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor):
        """(B, L, E) attended values and (B, h, L, S) weights."""
        cfg = self.mha.config
        if self.fused and self.weights:
            return torch.ops.mha.attention_weights(
                q, k, v, key_padding_mask, cfg.num_heads, cfg.causal
            )
        if self.fused:
            heads = torch.ops.mha.attention(q, k, v, key_padding_mask, cfg.num_heads, cfg.causal)
            return heads, None
        length, source = q.shape[1], k.shape[1]
        allowed = self.mha.allowed_mask(length, source, key_padding_mask, q)
        heads, weights = self.mha.attend(q, k, v, allowed, explicit=True)
        return self.mha.merge_heads(heads), weights

    def input_names(self) -> list[str]:
        """Graph input names, in order."""
        if self.self_attention:
            return ["query", "key_padding_mask"]
        return ["query", "key", "value", "key_padding_mask"]

    def output_names(self) -> list[str]:
        """Graph output names, in order."""
        return ["output", "attention_weights"] if self.weights else ["output"]


class SelfAttentionGraph(ExportGraph):
    """Inputs query (B, L, E) and key_padding_mask (B, L)."""

    def forward(self, query: Tensor, key_padding_mask: Tensor) -> tuple[Tensor, ...]:
        return self.compute(query, query, query, key_padding_mask)


class CrossAttentionGraph(ExportGraph):
    """Inputs query (B, L, E), key (B, S, kdim), value (B, S, vdim), key_padding_mask (B, S)."""

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor
    ) -> tuple[Tensor, ...]:
        return self.compute(query, key, value, key_padding_mask)


def build_graph(
    mha: MultiHeadAttention, self_attention: bool, weights: bool, fused: bool
) -> ExportGraph:
    """The traced module for one export."""
    cls = SelfAttentionGraph if self_attention else CrossAttentionGraph
    return cls(mha, self_attention, weights, fused).eval()
