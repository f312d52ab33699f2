"""Multi-head attention: MultiHead(Q, K, V) = Concat(head_1..head_h) W^O.

head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V), Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V.

`MultiHeadAttention.forward_with` is the block around an attention core (W^Q, W^K, W^V, the
core, W^O, zero rows with no key); eager runs it with `attend`, the export runs the same
method with the core swapped for one fused node (mha.export.graph). Decoding with a KV cache
(`forward_step`, `step_with`) is the same block over the new tokens only, its core
(`attend_step`) attending the cached keys and the new ones with the causal mask offset by P.
Cross-attention over a memory held between calls (`project_memory`, `forward_memory`,
`memory_with`) is the same block with W^K, W^V applied once, up front.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mha.model.config import AttentionConfig
from mha.model.kv_cache import KVCache
from mha.model.reference import reference_attention

# core(q (B, L, E), k (B, S, E), v (B, S, E), key_padding_mask (B, S) or None)
#   -> (heads merged back to (B, L, E), weights (B, h, L, S) or None)
AttentionCore = Callable[[Tensor, Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor | None]]
# step core(q, k, v of the T new tokens (B, T, E), past (B, P, E), key_padding_mask
#   (B, P + T) or None) -> heads merged back to (B, T, E)
StepCore = Callable[[Tensor, Tensor, Tensor, KVCache, Tensor | None], Tensor]


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
        return self.attend_projected(core, q, k, v, key_padding_mask)

    def attend_projected(
        self, core: AttentionCore, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """The block after W^Q, W^K, W^V: the core on q (B, L, E), k, v (B, S, E), then W^O.

        Returns the output (B, L, E) and the core's weights (B, h, L, S) or None, zero in
        rows of queries that may attend no key.
        """
        heads, weights = core(q, k, v, key_padding_mask)  # (B, L, E), (B, h, L, S) or None
        out = self.out_proj(heads)  # (B, L, E)
        return zero_rows_without_keys(out, weights, key_padding_mask, self.config.causal)

    def project_memory(self, key: Tensor, value: Tensor) -> KVCache:
        """A cross-attention memory projected once: key (B, S, kdim) W^K + b^K and value
        (B, S, vdim) W^V + b^V, both (B, S, E)."""
        return KVCache(self.k_proj(key), self.v_proj(value))

    def forward_memory(
        self,
        query: Tensor,
        memory: KVCache,
        key_padding_mask: Tensor | None = None,
        use_reference: bool = False,
    ) -> Tensor:
        """Cross-attend query (B, T, E) to a memory projected by project_memory (B, S, E).

        Equals forward(query, key, value, key_padding_mask) for memory =
        project_memory(key, value): the rows (B, T, E). use_reference as in forward().
        """
        self.check_memory(query, memory, key_padding_mask)
        core = self.core(explicit=use_reference)
        return self.memory_with(core, query, memory, key_padding_mask)[0]

    def memory_with(
        self, core: AttentionCore, query: Tensor, memory: KVCache, key_padding_mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """The block around a core with the keys and values given projected: W^Q, the core
        over memory (B, S, E), W^O; as forward_with otherwise."""
        q = self.q_proj(query)  # (B, T, E)
        return self.attend_projected(core, q, memory.key, memory.value, key_padding_mask)

    def check_memory(self, query: Tensor, memory: KVCache, key_padding_mask: Tensor | None) -> None:
        """Refuse a memory step this block cannot run: causal, or shapes that do not fit."""
        if self.config.causal:
            raise ValueError("forward_memory is cross-attention: it needs config.causal=False")
        e, batch = self.config.d_model, memory.batch
        if query.dim() != 3 or query.shape[0] != batch or query.shape[2] != e:
            raise ValueError(
                f"query shape {tuple(query.shape)} is not (B, T, E) = ({batch}, T, {e}) "
                f"for a memory of {batch} sequence(s)"
            )
        if memory.key.shape[2] != e:
            raise ValueError(f"memory rows have {memory.key.shape[2]} features, d_model is {e}")
        if key_padding_mask is not None:
            check_mask(key_padding_mask, batch, memory.length)

    def forward_step(
        self, x_new: Tensor, cache: KVCache, use_reference: bool = False
    ) -> tuple[Tensor, KVCache]:
        """Decode T new tokens x_new (B, T, E) of B sequences whose cache holds P tokens each.

        Causal self-attention: new token t attends the P cached tokens and new tokens 0..t,
        so the output rows (B, T, E) are the last T rows of forward() over all P + T tokens.
        Returns them and the cache grown to (B, P + T, E). use_reference as in forward().
        """
        self.check_step(x_new, cache)
        core = self.step_core(explicit=use_reference)
        out, key, value = self.step_with(core, x_new, cache, None)
        return out, cache.append(key, value)

    def step_with(
        self, core: StepCore, query: Tensor, past: KVCache, key_padding_mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The block around a step core: W^Q, W^K, W^V of the new tokens, the core, W^O.

        Args:
            query: (B, T, E) the new tokens.
            past: (B, P, E) projected keys and values of the tokens before them.
            key_padding_mask: (B, P + T) bool, True = padding (past slots, then new ones).

        Returns the output (B, T, E), zero in rows that may attend no key, and the new
        tokens' projected keys and values (B, T, E), the rows the cache grows by.
        """
        q = self.q_proj(query)  # (B, T, E)
        k, v = self.k_proj(query), self.v_proj(query)  # (B, T, E)
        heads = core(q, k, v, past, key_padding_mask)  # (B, T, E)
        out = self.out_proj(heads)  # (B, T, E)
        out, _ = zero_rows_without_keys(out, None, key_padding_mask, True, query.shape[1])
        return out, k, v

    def step_core(self, explicit: bool) -> StepCore:
        """This block's eager step core: the reference path if explicit, else SDPA."""
        return functools.partial(attend_step, num_heads=self.config.num_heads, explicit=explicit)

    def check_decodable(self) -> None:
        """Refuse decoding unless this block is causal self-attention over d_model features."""
        cfg = self.config
        if not cfg.causal:
            raise ValueError(
                "forward_step decodes causal self-attention only: it needs config.causal=True"
            )
        if not cfg.same_kv_dims:
            raise ValueError(
                f"decoding is self-attention: kdim={cfg.key_dim} and vdim={cfg.value_dim} must "
                f"equal d_model={cfg.d_model}"
            )

    def check_step(self, x_new: Tensor, cache: KVCache) -> None:
        """Refuse a step this block cannot decode, or tokens that do not fit the cache."""
        self.check_decodable()
        e, batch = self.config.d_model, cache.batch
        if x_new.dim() != 3 or x_new.shape[0] != batch or x_new.shape[2] != e or not x_new.shape[1]:
            raise ValueError(
                f"x_new shape {tuple(x_new.shape)} is not (B, T, E) = ({batch}, T >= 1, {e}) "
                f"for a cache of {batch} sequence(s)"
            )
        if cache.key.shape[2] != e:
            raise ValueError(f"cache rows have {cache.key.shape[2]} features, d_model is {e}")

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


def attend_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    past: KVCache,
    key_padding_mask: Tensor | None,
    num_heads: int,
    explicit: bool,
) -> Tensor:
    """The step core: new queries q (B, T, E) over the past keys and the new k, v (B, T, E).

    Query t attends keys 0..P+t of concat(past, new) (B, P + T, E): `attend` with the causal
    mask aligned at the last key. Returns the heads merged back to (B, T, E). An export
    replaces this function by one fused node.
    """
    keys = torch.cat([past.key, k], dim=1)  # (B, P + T, E)
    values = torch.cat([past.value, v], dim=1)  # (B, P + T, E)
    return attend(q, keys, values, key_padding_mask, num_heads, True, explicit)[0]


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, T, E) -> (B, h, T, d)."""
    b, t, e = x.shape
    return x.view(b, t, num_heads, e // num_heads).transpose(1, 2)  # (B, h, T, d)


def merge_heads(x: Tensor) -> Tensor:
    """(B, h, T, d) -> (B, T, E): Concat(head_1..head_h)."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)  # (B, T, E)


def allowed_mask(q: Tensor, k: Tensor, key_padding_mask: Tensor | None, causal: bool) -> Tensor:
    """(B, 1, L, S) bool: True where query l of q (B, L, E) may attend key s of k (B, S, E).

    causal: query l sees keys 0..S-L+l, the triangle aligned at the last key (S = L in
    self-attention; S = P + L when decoding L new tokens after P cached ones).
    """
    (b, length, _), source_length = q.shape, k.shape[1]
    if key_padding_mask is None:
        keep = torch.ones(b, source_length, dtype=torch.bool, device=q.device)
    else:
        keep = ~key_padding_mask  # (B, S)
    allowed = keep[:, None, None, :].expand(b, 1, length, source_length)  # (B, 1, L, S)
    if causal:
        causal_mask = torch.ones(length, source_length, dtype=torch.bool, device=q.device)
        allowed = allowed & causal_mask.tril(diagonal=source_length - length)
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


def rows_with_keys(
    key_padding_mask: Tensor, causal: bool, query_length: int | None = None
) -> Tensor:
    """Query rows that may attend at least one key: (B, L, 1) when causal, else (B, 1, 1).

    Read from the (B, S) mask alone, never from a (B, 1, L, S) one, so that an exported
    graph around a fused attention node stays small. When causal, row l sees keys
    0..S-L+l with L = query_length (None: L = S, self-attention over the same tokens).
    """
    keep = ~key_padding_mask  # (B, S)
    if causal:
        seen = torch.cumsum(keep.to(torch.int32), dim=1) > 0  # (B, S): a key among 0..s
        if query_length is not None:
            seen = seen[:, seen.shape[1] - query_length :]  # (B, L): row l at key S-L+l
        return seen.unsqueeze(-1)  # (B, L, 1)
    return keep.any(dim=1, keepdim=True).unsqueeze(-1)  # (B, 1, 1), broadcasts over L


def zero_rows_without_keys(
    out: Tensor,
    weights: Tensor | None,
    key_padding_mask: Tensor | None,
    causal: bool,
    query_length: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Zero the output rows (B, L, E) and weight rows (B, h, L, S) of queries with no key.

    query_length as in rows_with_keys (None: L = S).
    """
    if key_padding_mask is None:  # nothing padded: every query may attend key 0
        return out, weights
    rows = rows_with_keys(key_padding_mask, causal, query_length)  # (B, L|1, 1)
    out = torch.where(rows, out, torch.zeros_like(out))
    if weights is not None:
        weights = torch.where(rows.unsqueeze(1), weights, torch.zeros_like(weights))
    return out, weights
