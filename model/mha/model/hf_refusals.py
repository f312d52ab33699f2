"""Checkpoints whose attention is not this module's, and what they have that it lacks.

The module computes softmax(q k^T * s + mask) v over h heads that each have their own K and
V projections, with nothing added to the scores but the padding and causal masks. Anything
that changes the scores by position (a learned bias, rotations of q and k, linear biases) or
shares K/V between heads cannot be expressed by its weights, so such a checkpoint is refused
rather than exported with different numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

RELATIVE_BIAS = "a learned relative position bias added to the attention scores"
ROTARY = "rotary position embeddings (q and k rotated by position inside the attention)"
ALIBI = "ALiBi (a linear bias by distance added to the attention scores)"
DISENTANGLED = "disentangled relative-position attention (extra content-position score terms)"
LOCAL = "local (windowed) attention layers and unscaled scores"

# model_type -> what its attention has that the module lacks
KNOWN = {
    "t5": RELATIVE_BIAS,
    "mt5": RELATIVE_BIAS,
    "umt5": RELATIVE_BIAS,
    "longt5": RELATIVE_BIAS,
    "switch_transformers": RELATIVE_BIAS,
    "llama": ROTARY,
    "mistral": ROTARY,
    "mixtral": ROTARY,
    "qwen2": ROTARY,
    "qwen3": ROTARY,
    "gemma": ROTARY,
    "gemma2": ROTARY,
    "gemma3": ROTARY,
    "phi": ROTARY,
    "phi3": ROTARY,
    "gpt_neox": ROTARY,
    "gptj": ROTARY,
    "codegen": ROTARY,
    "stablelm": ROTARY,
    "olmo": ROTARY,
    "olmo2": ROTARY,
    "bloom": ALIBI,
    "mpt": ALIBI,
    "deberta": DISENTANGLED,
    "deberta-v2": DISENTANGLED,
    "gpt_neo": LOCAL,
}


def refusal(config: Mapping[str, Any]) -> str | None:
    """Why the checkpoint's attention is not this module's, or None when it may be."""
    model_type = str(config.get("model_type", ""))
    reasons = []
    if model_type == "falcon":
        reasons.append(ALIBI if config.get("alibi") else ROTARY)
    elif model_type in KNOWN:
        reasons.append(KNOWN[model_type])
    position = config.get("position_embedding_type", "absolute")
    if position not in ("absolute", None):
        reasons.append(f"position_embedding_type={position!r} (relative position score terms)")
    grouped = grouped_query(config)
    if grouped:
        reasons.append(grouped)
    if not reasons:
        return None
    return (
        f"{model_type or 'this'} checkpoint's attention has {' and '.join(reasons)}; "
        "the module's attention has no such term, so its outputs would differ"
    )


def grouped_query(config: Mapping[str, Any]) -> str | None:
    """Grouped-query or multi-query attention: fewer K/V heads than query heads."""
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads")
    if config.get("multi_query"):
        return "multi-query attention (one K/V head shared by every query head)"
    if isinstance(heads, int) and isinstance(kv_heads, int) and kv_heads < heads:
        return (
            f"grouped-query attention (num_key_value_heads={kv_heads} < "
            f"num_attention_heads={heads}: K/V heads shared between query heads)"
        )
    return None
