"""The fused step op of a KV-cache export, and its ONNX translation per target and feed.

Like mha::attention (fused_ops), `mha::attention_step` is one opaque call that the
custom_translation_table turns into exactly one fused node; run eagerly it is the model's own
step core (mha.model.attention.attend_step). The node gets concat(past, new) as 3D key and
value and an explicit mask (options.STEP_FEEDS says why, with the figures measured).
"""

from __future__ import annotations

import onnx
import torch
from onnxscript import opset18 as op18
from onnxscript import opset23 as op23
from torch import Tensor

from mha.export.contrib_schema import register_contrib_schema
from mha.export.fused_ops import MSFT
from mha.model.attention import attend_step
from mha.model.kv_cache import KVCache


@torch.library.custom_op("mha::attention_step", mutates_args=())
def attention_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    past_key: Tensor,
    past_value: Tensor,
    key_padding_mask: Tensor,
    num_heads: int,
) -> Tensor:
    """Attention of the new q, k, v (B, T, E) over past (B, P, E) and themselves: (B, T, E)."""
    past = KVCache(past_key, past_value)
    return attend_step(q, k, v, past, key_padding_mask, num_heads, explicit=True)


@attention_step.register_fake
def _attention_step_fake(q, k, v, past_key, past_value, key_padding_mask, num_heads):
    return torch.empty_like(q)


def _causal_keep(op, q, key_padding_mask, axes: list[int]):
    """Bool, True where new query t may attend slot c: not padding and c <= C - T + t.

    The causal part is built here because the nodes' own flags align it wrongly for decoding
    (ONNX Attention's is_causal is upper-left; MultiHeadAttention's unidirectional counts
    only its past input). axes [1] gives (B, T, C), [1, 2] gives (B, 1, T, C).
    """
    slots = op.Squeeze(op.Shape(key_padding_mask, start=1, end=2))  # C
    new = op.Squeeze(op.Shape(q, start=1, end=2))  # T
    one = op.Constant(value_int=1)
    cols = op.Range(op.Constant(value_int=0), slots, one)  # (C,)
    last = op.Unsqueeze(op.Range(op.Sub(slots, new), slots, one), op.Constant(value_ints=[1]))
    causal = op.LessOrEqual(cols, last)  # (T, C): the last slot query t sees is C - T + t
    keep = op.Unsqueeze(op.Not(key_padding_mask), op.Constant(value_ints=axes))
    return op.And(keep, causal)


def ort_attention_step(q, k, v, past_key, past_value, key_padding_mask, num_heads: int):
    """com.microsoft.MultiHeadAttention on concat(past, new), mask int32 (B, T, C), 1 = keep."""
    register_contrib_schema("MultiHeadAttention")
    keys = op18.Concat(past_key, k, axis=1)  # (B, C, E)
    values = op18.Concat(past_value, v, axis=1)  # (B, C, E)
    keep = op18.Cast(_causal_keep(op18, q, key_padding_mask, [1]), to=onnx.TensorProto.INT32)
    out, _, _, _ = MSFT.MultiHeadAttention(q, keys, values, None, keep, num_heads=num_heads)
    return out


def onnx_attention_step_concat(q, k, v, past_key, past_value, key_padding_mask, num_heads: int):
    """ONNX Attention (opset 23) on concat(past, new) as 3D key/value, bool mask (B, 1, T, C)."""
    keys = op23.Concat(past_key, k, axis=1)  # (B, C, E)
    values = op23.Concat(past_value, v, axis=1)  # (B, C, E)
    keep = _causal_keep(op23, q, key_padding_mask, [1, 2])
    out, _, _, _ = op23.Attention(
        q, keys, values, keep, q_num_heads=num_heads, kv_num_heads=num_heads
    )
    return out


def onnx_attention_step_fp32(q, k, v, past_key, past_value, key_padding_mask, num_heads: int):
    """As onnx_attention_step_concat with the node computing in fp32 (fp16 exports).

    ORT's CPU fp16 Attention kernel alone uses ~0.8 of the fp16 parity bound on exact
    inputs; with the fp16 cache's own rounding that exceeds it. In fp32 it holds, and on
    CPU it is no slower at B = 1 than the fp16 node (options.STEP_FEEDS).
    """
    fp32, fp16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    keys = _cast(op23.Concat(past_key, k, axis=1), fp32)  # (B, C, E)
    values = _cast(op23.Concat(past_value, v, axis=1), fp32)  # (B, C, E)
    keep = _causal_keep(op23, q, key_padding_mask, [1, 2])
    out, _, _, _ = op23.Attention(
        _cast(q, fp32), keys, values, keep, q_num_heads=num_heads, kv_num_heads=num_heads
    )
    return _cast(out, fp16)


def _cast(x, to):
    # Unannotated on purpose: onnxscript types Cast's result as every tensor type, which
    # Attention's type variables refuse under mypy.
    return op23.Cast(x, to=to)


TRANSLATIONS = {
    ("ort", "concat"): ort_attention_step,
    ("onnx", "concat"): onnx_attention_step_concat,
    ("onnx", "concat-fp32"): onnx_attention_step_fp32,
}


def step_translation_table(target: str, feed: str) -> dict:
    """custom_translation_table of a step graph; empty for the decomposed target."""
    if target == "none":
        return {}
    return {torch.ops.mha.attention_step.default: TRANSLATIONS[(target, feed)]}
