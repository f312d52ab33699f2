"""One attention block of a BERT-style safetensors file: `--bert`, a case of `--hf`.

The file may be named anything and its config.json may be absent when num_heads is given:
the layer is found by its tensor names (mha.model.hf_layers.bert_layer) and d_model read
from the query weight.
"""

from __future__ import annotations

from pathlib import Path

from mha.model.attention import MultiHeadAttention
from mha.model.checkpoint import Checkpoint
from mha.model.hf import module_of
from mha.model.hf_layers import LayerChoice, bert_layer
from mha.model.weights import WeightsError


def from_bert(path: Path, layer: int = 0, num_heads: int | None = None) -> MultiHeadAttention:
    """Load attention block `layer` of a BERT-style safetensors checkpoint."""
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    checkpoint = Checkpoint(path.parent, weights_file=path.name)
    found = bert_layer(checkpoint, LayerChoice(layer), heads=num_heads)
    return module_of(found, str(path))
