"""Where one attention block lives in a Hugging Face checkpoint, per family, in our terms.

Every family's block is q/k/v projections, softmax(q k^T * scale) v per head and an output
projection; what differs is the names, the weight layout, the config keys and the scale.
Each finder returns the block's tensors renamed to the module's (`q_proj.weight`, ...), in
nn.Linear's (out, in) layout, fp32, with its sizes, causality and score scale.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mha.model.checkpoint import Checkpoint
from mha.model.weights import PROJECTIONS, WeightsError

ATTENTIONS = ("self", "cross")
STACKS = ("encoder", "decoder")


@dataclass(frozen=True)
class LayerChoice:
    """Which block: layer N of a stack (None: the checkpoint's decoder, if it has one)."""

    layer: int = 0
    attention: str = "self"
    stack: str | None = None

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention {self.attention!r} must be one of {', '.join(ATTENTIONS)}")
        if self.stack is not None and self.stack not in STACKS:
            raise ValueError(f"stack {self.stack!r} must be one of {', '.join(STACKS)}")
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")


@dataclass(frozen=True)
class FoundLayer:
    """One attention block of a checkpoint: sizes, kind and tensors under our names."""

    family: str
    stack: str
    layer: int
    attention: str
    d_model: int
    num_heads: int
    causal: bool
    # the checkpoint's factor on q k^T; None: 1/sqrt(head_dim), the module's own
    scale: float | None
    tensors: dict[str, Tensor]


def check_layer(checkpoint: Checkpoint, choice: LayerChoice, count: int, what: str) -> None:
    """Refuse a layer index past the stack's count, naming the count."""
    if choice.layer >= count:
        raise WeightsError(
            f"{checkpoint.folder}: layer {choice.layer} is out of range: the {what} has "
            f"{count} layer{'s' if count != 1 else ''} (0-{count - 1})"
        )


def find_prefix(checkpoint: Checkpoint, pattern: str, shown: str) -> str:
    """The name prefix before `pattern` (a regex matching a full tensor name's tail)."""
    compiled = re.compile(rf"^(.*?){pattern}$")
    for name in checkpoint.names:
        match = compiled.match(name)
        if match:
            return match.group(1)
    numbered = (re.search(r"\.(\d+)\.", n) for n in checkpoint.names)
    layers = sorted({int(m.group(1)) for m in numbered if m})
    raise WeightsError(
        f"{checkpoint.folder}: no tensor '...{shown}' (layers found: {layers or 'none'})"
    )


def fetch(checkpoint: Checkpoint, name: str, shape: tuple[int, ...]) -> Tensor:
    """One tensor as fp32, refusing a shape other than expected (naming key and shapes)."""
    tensor = checkpoint.tensor(name)
    if tuple(tensor.shape) != shape:
        raise WeightsError(
            f"{checkpoint.folder}: tensor {name!r} has shape {tuple(tensor.shape)}, "
            f"expected {shape}"
        )
    return tensor.to(torch.float32)


def linear_tensors(
    checkpoint: Checkpoint, names: dict[str, str], e: int, zero_bias: tuple[str, ...] = ()
) -> dict[str, Tensor]:
    """Our q/k/v/out tensors from nn.Linear-layout names (ours -> theirs, without .weight).

    zero_bias: projections that the family defines without a bias (Whisper's k_proj):
    x W + 0 is exactly x W, so a zero bias keeps the module's one-bias-for-all layout.
    """
    tensors = {}
    for ours in PROJECTIONS:
        theirs = names[ours]
        tensors[f"{ours}.weight"] = fetch(checkpoint, f"{theirs}.weight", (e, e))
        if ours in zero_bias and not checkpoint.has(f"{theirs}.bias"):
            tensors[f"{ours}.bias"] = torch.zeros(e)
        else:
            tensors[f"{ours}.bias"] = fetch(checkpoint, f"{theirs}.bias", (e,))
    return tensors


def gpt2_layer(checkpoint: Checkpoint, choice: LayerChoice) -> FoundLayer:
    """GPT-2: Conv1D projections (y = x W + b, W stored (in, out), the transpose of nn.Linear),
    Q, K, V fused in `c_attn` (E, 3E) in that order; cross-attention (add_cross_attention)
    has `q_attn` (E, E) and `c_attn` (E, 2E) for K, V."""
    if choice.stack == "encoder":
        raise WeightsError(f"{checkpoint.folder}: gpt2 is a decoder only: no encoder stack")
    if choice.attention == "cross" and not checkpoint.setting("add_cross_attention", False):
        raise WeightsError(
            f"{checkpoint.folder}: gpt2 layers have no cross-attention (add_cross_attention "
            "is false in config.json)"
        )
    e, heads = checkpoint.integer("n_embd"), checkpoint.integer("n_head")
    check_layer(checkpoint, choice, checkpoint.integer("n_layer"), "gpt2 decoder")
    block = "crossattention" if choice.attention == "cross" else "attn"
    n = choice.layer
    prefix = find_prefix(checkpoint, rf"h\.{n}\.{block}\.c_attn\.weight", f"h.{n}.{block}.c_attn")
    base = f"{prefix}h.{n}.{block}."
    fused = fetch(checkpoint, f"{base}c_attn.weight", (e, 3 * e if block == "attn" else 2 * e))
    fused_bias = fetch(checkpoint, f"{base}c_attn.bias", (fused.shape[1],))
    weights, biases = list(fused.split(e, dim=1)), list(fused_bias.split(e))
    if block == "crossattention":  # q from the decoder stream, k and v from the memory
        weights.insert(0, fetch(checkpoint, f"{base}q_attn.weight", (e, e)))
        biases.insert(0, fetch(checkpoint, f"{base}q_attn.bias", (e,)))
    weights.append(fetch(checkpoint, f"{base}c_proj.weight", (e, e)))
    biases.append(fetch(checkpoint, f"{base}c_proj.bias", (e,)))
    tensors = {}
    for ours, weight, bias in zip(PROJECTIONS, weights, biases, strict=True):
        tensors[f"{ours}.weight"] = weight.T.contiguous()  # Conv1D (in, out) -> (out, in)
        tensors[f"{ours}.bias"] = bias
    return FoundLayer(
        "gpt2", "decoder", n, choice.attention, e, heads, choice.attention == "self",
        gpt2_scale(checkpoint, e // heads, n), tensors,
    )  # fmt: skip


def gpt2_scale(checkpoint: Checkpoint, head_dim: int, layer: int) -> float:
    """GPT-2's factor on q k^T: 1/sqrt(d) if scale_attn_weights (the default), else 1;
    further divided by layer + 1 with scale_attn_by_inverse_layer_idx."""
    scale = head_dim**-0.5 if checkpoint.setting("scale_attn_weights", True) else 1.0
    if checkpoint.setting("scale_attn_by_inverse_layer_idx", False):
        scale /= float(layer + 1)
    return scale


def seq2seq_layer(checkpoint: Checkpoint, choice: LayerChoice) -> FoundLayer:
    """BART, mBART, Marian, Whisper: `{stack}.layers.N.self_attn` / `encoder_attn` with
    q_proj, k_proj, v_proj, out_proj (nn.Linear), q scaled by head_dim^-0.5. Whisper's
    k_proj has no bias."""
    family = str(checkpoint.setting("model_type"))
    stack = choice.stack or "decoder"
    if choice.attention == "cross" and stack == "encoder":
        raise WeightsError(
            f"{checkpoint.folder}: {family} encoder layers have no cross-attention "
            "(cross is a decoder layer's attention over the encoder output)"
        )
    e = checkpoint.integer("d_model")
    heads = checkpoint.integer(f"{stack}_attention_heads")  # cross uses the decoder's too
    check_layer(checkpoint, choice, checkpoint.integer(f"{stack}_layers"), f"{family} {stack}")
    block = "encoder_attn" if choice.attention == "cross" else "self_attn"
    tail = rf"{stack}\.layers\.{choice.layer}\.{block}\.q_proj\.weight"
    shown = f"{stack}.layers.{choice.layer}.{block}.q_proj.weight"
    base = f"{find_prefix(checkpoint, tail, shown)}{stack}.layers.{choice.layer}.{block}."
    names = {ours: f"{base}{ours}" for ours in PROJECTIONS}
    zero_bias = ("k_proj",) if family == "whisper" else ()
    tensors = linear_tensors(checkpoint, names, e, zero_bias)
    causal = stack == "decoder" and choice.attention == "self"
    layer, attention = choice.layer, choice.attention
    return FoundLayer(family, stack, layer, attention, e, heads, causal, None, tensors)


BERT_NAMES = {  # ours -> theirs, relative to `{prefix}encoder.layer.{N}.{block}.`
    "q_proj": "self.query",
    "k_proj": "self.key",
    "v_proj": "self.value",
    "out_proj": "output.dense",
}


def bert_layer(checkpoint: Checkpoint, choice: LayerChoice, heads: int | None = None) -> FoundLayer:
    """BERT-style encoders (BERT, RoBERTa, XLM-R, ELECTRA): `encoder.layer.N.attention`
    with self.query/key/value and output.dense; causal when config.is_decoder, and a
    `crossattention` block with add_cross_attention.

    Without num_hidden_layers / hidden_size in config.json (a bare `--bert` file), the
    layer is looked up by name and d_model read from the query weight.
    """
    if choice.stack == "decoder" and not checkpoint.setting("is_decoder", False):
        raise WeightsError(f"{checkpoint.folder}: this BERT-style model is an encoder only")
    if choice.attention == "cross" and not checkpoint.setting("add_cross_attention", False):
        raise WeightsError(
            f"{checkpoint.folder}: BERT-style encoder layers have no cross-attention "
            "(add_cross_attention is false in config.json)"
        )
    if checkpoint.setting("num_hidden_layers") is not None:
        check_layer(checkpoint, choice, checkpoint.integer("num_hidden_layers"), "encoder")
    block = "crossattention" if choice.attention == "cross" else "attention"
    tail = rf"encoder\.layer\.{choice.layer}\.{block}\.self\.query\.weight"
    shown = f"encoder.layer.{choice.layer}.{block}.self.query.weight"
    base = f"{find_prefix(checkpoint, tail, shown)}encoder.layer.{choice.layer}.{block}."
    e = checkpoint.tensor(f"{base}self.query.weight").shape[0]
    if heads is None:
        heads = checkpoint.integer("num_attention_heads")
    tensors = linear_tensors(checkpoint, {o: base + t for o, t in BERT_NAMES.items()}, e)
    causal = bool(checkpoint.setting("is_decoder", False)) and choice.attention == "self"
    stack = "decoder" if checkpoint.setting("is_decoder", False) else "encoder"
    family = str(checkpoint.setting("model_type", "bert"))
    layer, attention = choice.layer, choice.attention
    return FoundLayer(family, stack, layer, attention, e, heads, causal, None, tensors)


FAMILIES: dict[str, Callable[[Checkpoint, LayerChoice], FoundLayer]] = {
    "gpt2": gpt2_layer,
    "bart": seq2seq_layer,
    "mbart": seq2seq_layer,
    "marian": seq2seq_layer,
    "whisper": seq2seq_layer,
    "bert": bert_layer,
    "roberta": bert_layer,
    "xlm-roberta": bert_layer,
    "electra": bert_layer,
}


def fold_scale(tensors: dict[str, Tensor], scale: float | None, head_dim: int) -> dict[str, Tensor]:
    """The q projection times scale * sqrt(d), so the module's 1/sqrt(d) gives `scale`.

    softmax((c q) k^T / sqrt(d)) = softmax(q k^T * c / sqrt(d)), and c q = x (c W) + c b, so
    scaling W^Q and b^Q by c = scale * sqrt(d) is exact in real arithmetic (GPT-2 without
    scale_attn_weights, or with scale_attn_by_inverse_layer_idx). scale None or a factor
    of 1 (BART's head_dim^-0.5 on q is the module's own 1/sqrt(d)) leaves them untouched.
    """
    if scale is None:
        return tensors
    factor = scale * math.sqrt(head_dim)
    if math.isclose(factor, 1.0, rel_tol=1e-12):
        return tensors
    folded = dict(tensors)
    folded["q_proj.weight"] = tensors["q_proj.weight"] * factor
    folded["q_proj.bias"] = tensors["q_proj.bias"] * factor
    return folded
