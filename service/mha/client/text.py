"""`mha infer --text`: a sentence as the input of a checkpoint's layer-0 attention.

The checkpoint's own tokenizer (tokenizer.json, through the optional `tokenizers` package)
splits the text; its embeddings (numpy, no torch) make the rows the layer's attention
receives:

- BERT-style: word + position + token type embeddings, then the embedding LayerNorm;
- BART: token embeddings * embed_scale (sqrt(d_model) with scale_embedding) + learned
  positions, which BART offsets by 2, then layernorm_embedding. mBART is the same and
  normalises before attention (the layer's self_attn_layer_norm), so that is applied too.

BERT and BART are post-LN: their layer-0 attention gets the embeddings themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mha.client.tensors import CheckpointError, Tensors, read_json

BART_POSITION_OFFSET = 2  # BartLearnedPositionalEmbedding: row 0 is position -2
TEXT_FAMILIES = ("bert", "bart", "mbart")


@dataclass(frozen=True)
class TextInput:
    """The tokens of a text and the rows [1, L, E] fp32 of the layer's input."""

    tokens: list[str]
    query: np.ndarray


def tokenize(folder: Path, text: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(tokens, ids [L], type ids [L]) with the checkpoint's tokenizer.json."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise CheckpointError(
            "--text needs the tokenizers package: pip install 'mha-serve[text]'"
        ) from None
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (--text uses the checkpoint's tokenizer)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
        tokenizer.no_padding()  # some files pad to a fixed length (all-MiniLM-L6-v2: 128)
        encoding = tokenizer.encode(text)
    except Exception as err:  # tokenizers raises its own Exception type for a bad file
        raise CheckpointError(f"{path}: not a readable tokenizer ({err})") from err
    return list(encoding.tokens), np.asarray(encoding.ids), np.asarray(encoding.type_ids)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis, computed in float64."""
    x = x.astype(np.float64)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def prefixed(tensors: Tensors, *tails: str) -> str:
    """The full name of the first tensor ending in one of `tails` (in order), whatever the
    model's prefix ("bert.", "model.", none); CheckpointError naming the first tail."""
    names = tensors.names()
    for tail in tails:
        for name in names:
            if name == tail or name.endswith("." + tail):
                return name
    raise CheckpointError(f"{tensors.folder}: no tensor '...{tails[0]}'")


def bert_rows(tensors: Tensors, config: dict, ids: np.ndarray, types: np.ndarray) -> np.ndarray:
    """BERT's embeddings output (L, E), float64."""
    table = {
        part: tensors.get(prefixed(tensors, f"embeddings.{part}.weight"))
        for part in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    }
    rows = (
        table["word_embeddings"][ids].astype(np.float64)
        + table["token_type_embeddings"][types]
        + table["position_embeddings"][np.arange(len(ids))]
    )
    # older checkpoints name LayerNorm's weight and bias gamma and beta
    norm = prefixed(tensors, "embeddings.LayerNorm.weight", "embeddings.LayerNorm.gamma")
    bias = prefixed(tensors, "embeddings.LayerNorm.bias", "embeddings.LayerNorm.beta")
    eps = float(config.get("layer_norm_eps", 1e-12))
    return layer_norm(rows, tensors.get(norm), tensors.get(bias), eps)


def bart_rows(
    tensors: Tensors, config: dict, ids: np.ndarray, stack: str, pre_norm: bool
) -> np.ndarray:
    """BART's (mBART's) `stack` embeddings output (L, E), float64; with pre_norm, also
    layer 0's self_attn_layer_norm (what mBART's attention gets)."""
    # tied embeddings: save_pretrained keeps one of the names
    table = prefixed(tensors, f"{stack}.embed_tokens.weight", "shared.weight")
    scale = float(np.sqrt(config["d_model"])) if config.get("scale_embedding") else 1.0
    positions = tensors.get(prefixed(tensors, f"{stack}.embed_positions.weight"))
    rows = tensors.get(table)[ids].astype(np.float64) * scale
    rows = rows + positions[np.arange(len(ids)) + BART_POSITION_OFFSET]
    rows = norm_by(tensors, rows, f"{stack}.layernorm_embedding")
    if pre_norm:
        rows = norm_by(tensors, rows, f"{stack}.layers.0.self_attn_layer_norm")
    return rows


def norm_by(tensors: Tensors, rows: np.ndarray, module: str) -> np.ndarray:
    """rows through the checkpoint's LayerNorm `module` (eps 1e-5, torch's default)."""
    weight = tensors.get(prefixed(tensors, f"{module}.weight"))
    return layer_norm(rows, weight, tensors.get(prefixed(tensors, f"{module}.bias")), 1e-5)


def text_input(folder: Path, text: str, stack: str | None = None) -> TextInput:
    """The layer-0 attention input of `text` for the checkpoint in `folder`.

    stack: BART's "encoder" or "decoder" (default decoder, as `mha export --hf`).
    """
    config = read_json(folder / "config.json")
    family = config.get("model_type")
    if family not in TEXT_FAMILIES:
        raise CheckpointError(
            f"{folder / 'config.json'}: --text builds the input of {', '.join(TEXT_FAMILIES)} "
            f"checkpoints; model_type is {family!r}"
        )
    tokens, ids, types = tokenize(folder, text)
    tensors = Tensors(folder)
    if family == "bert":
        rows = bert_rows(tensors, config, ids, types)
    else:
        rows = bart_rows(tensors, config, ids, stack or "decoder", pre_norm=family == "mbart")
    return TextInput(tokens, rows.astype(np.float32)[None])
