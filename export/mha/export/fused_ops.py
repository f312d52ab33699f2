"""The fused attention op: a torch custom op, and its ONNX translation per target.

The exporter sees `mha::attention` as one opaque call and the custom_translation_table turns
it into exactly one fused node (torch.onnx's own lowering of SDPA fuses only in narrow cases,
and post-hoc fusers find nothing in a dynamo export). Run eagerly, the op is the model's own
attention core (mha.model.attention.attend): the math lives in model/ only.
"""

from __future__ import annotations

import onnx
import onnxscript
import torch
from onnxscript import opset18 as op18
from onnxscript import opset23 as op23
from torch import Tensor

from mha.export.contrib_schema import register_contrib_schema
from mha.model.attention import attend


@torch.library.custom_op("mha::attention", mutates_args=())
def attention(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor, num_heads: int, causal: bool
) -> Tensor:
    """Attention of projected q (B, L, E) and k, v (B, S, E); returns (B, L, E)."""
    return attend(q, k, v, key_padding_mask, num_heads, causal, explicit=True)[0]


@attention.register_fake
def _attention_fake(q, k, v, key_padding_mask, num_heads, causal):
    return torch.empty_like(q)


@torch.library.custom_op("mha::attention_weights", mutates_args=())
def attention_weights(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor, num_heads: int, causal: bool
) -> tuple[Tensor, Tensor]:
    """Like mha::attention, also returning the weights (B, h, L, S)."""
    heads, weights = attend(q, k, v, key_padding_mask, num_heads, causal, explicit=True)
    assert weights is not None  # the explicit path always returns them
    return heads, weights


@attention_weights.register_fake
def _attention_weights_fake(q, k, v, key_padding_mask, num_heads, causal):
    b, length, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, num_heads, length, k.shape[1]))


MSFT = onnxscript.values.Opset("com.microsoft", 1)


def _ort_node(q, k, v, key_padding_mask, num_heads: int, causal: bool):
    """The MultiHeadAttention node's outputs (output, present_key, present_value, qk)."""
    register_contrib_schema("MultiHeadAttention")
    keep = op18.Cast(op18.Not(key_padding_mask), to=onnx.TensorProto.INT32)
    # torch's tracer gives the node every output of the schema; unused ones are blanked
    # after export (onnx_graph.drop_unused_outputs), so ORT never computes them.
    return MSFT.MultiHeadAttention(
        q, k, v, None, keep, num_heads=num_heads, unidirectional=int(causal)
    )


def ort_attention(q, k, v, key_padding_mask, num_heads: int, causal: bool):
    """com.microsoft.MultiHeadAttention; the mask goes in as int32 (B, S), 1 = keep."""
    out, _, _, _ = _ort_node(q, k, v, key_padding_mask, num_heads, causal)
    return out


def ort_attention_weights(q, k, v, key_padding_mask, num_heads: int, causal: bool):
    """As ort_attention, with weights = Softmax of the node's `qk` output.

    `qk` holds the scaled, masked scores (B, h, L, S) before softmax, so this graph carries
    one Softmax on the weights branch; the output itself still comes from the fused node.
    """
    out, _, _, qk = _ort_node(q, k, v, key_padding_mask, num_heads, causal)
    return out, op18.Softmax(qk, axis=-1)


def _onnx_mask(q, k, key_padding_mask):
    """Bool (B, 1, L, S), True = take part, from the (B, S) padding mask.

    ORT's CPU Attention kernel rejects a mask that broadcasts over the query axis
    ((B, 1, 1, S): "inconsistent q_sequence_length"), so it is expanded over L.
    """
    keep = op23.Unsqueeze(op23.Not(key_padding_mask), op23.Constant(value_ints=[1, 2]))
    shape = op23.Concat(
        op23.Shape(q, start=0, end=1),
        op23.Constant(value_ints=[1]),
        op23.Shape(q, start=1, end=2),
        op23.Shape(k, start=1, end=2),
        axis=0,
    )
    return op23.Expand(keep, shape)


def _onnx_node(q, k, v, key_padding_mask, num_heads: int, causal: bool, weights: bool):
    """The Attention node's outputs (Y, present_key, present_value, qk_matmul_output)."""
    mode = {"qk_matmul_output_mode": 3} if weights else {}  # 3 = after softmax: the weights
    return op23.Attention(
        q,
        k,
        v,
        _onnx_mask(q, k, key_padding_mask),
        q_num_heads=num_heads,
        kv_num_heads=num_heads,
        is_causal=int(causal),
        **mode,
    )


def onnx_attention(q, k, v, key_padding_mask, num_heads: int, causal: bool):
    """ONNX Attention (opset 23), 3D inputs with q_num_heads/kv_num_heads."""
    out, _, _, _ = _onnx_node(q, k, v, key_padding_mask, num_heads, causal, weights=False)
    return out


def onnx_attention_weights(q, k, v, key_padding_mask, num_heads: int, causal: bool):
    """As onnx_attention, with the node's own weights output (qk_matmul_output_mode=3)."""
    out, _, _, weights = _onnx_node(q, k, v, key_padding_mask, num_heads, causal, weights=True)
    return out, weights


def translation_table(target: str) -> dict:
    """custom_translation_table for torch.onnx.export; empty for the decomposed target."""
    if target == "ort":
        return {
            torch.ops.mha.attention.default: ort_attention,
            torch.ops.mha.attention_weights.default: ort_attention_weights,
        }
    if target == "onnx":
        return {
            torch.ops.mha.attention.default: onnx_attention,
            torch.ops.mha.attention_weights.default: onnx_attention_weights,
        }
    return {}
