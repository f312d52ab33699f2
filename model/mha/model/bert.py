"""One attention block of a Hugging Face BERT-style checkpoint (safetensors)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mha.model.attention import MultiHeadAttention
from mha.model.config import AttentionConfig
from mha.model.weights import WeightsError, load_state, read_safetensors

# HF name -> ours, relative to `{prefix}encoder.layer.{N}.attention.`
BERT_NAMES = {
    "self.query": "q_proj",
    "self.key": "k_proj",
    "self.value": "v_proj",
    "output.dense": "out_proj",
}


def layer_prefix(names: list[str], layer: int, path: Path) -> str:
    """Find `{prefix}encoder.layer.{layer}.attention.` among the checkpoint's names."""
    pattern = re.compile(rf"^(.*?)encoder\.layer\.{layer}\.attention\.self\.query\.weight$")
    for name in names:
        match = pattern.match(name)
        if match:
            return f"{match.group(1)}encoder.layer.{layer}.attention."
    layers = sorted({int(m.group(1)) for n in names if (m := re.search(r"layer\.(\d+)\.", n))})
    raise WeightsError(
        f"{path}: no tensor '...encoder.layer.{layer}.attention.self.query.weight' "
        f"(layers found: {layers or 'none'})"
    )


def heads_from_config(path: Path, num_heads: int | None) -> int:
    """num_heads from the argument, else from config.json beside the checkpoint."""
    if num_heads is not None:
        return num_heads
    config_path = path.parent / "config.json"
    try:
        return int(json.loads(config_path.read_text())["num_attention_heads"])
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise WeightsError(
            f"{path}: num_heads not given and no num_attention_heads in {config_path} ({err})"
        ) from err


def from_bert(path: Path, layer: int = 0, num_heads: int | None = None) -> MultiHeadAttention:
    """Load attention block `layer` of a BERT-style safetensors checkpoint."""
    tensors, _ = read_safetensors(path)
    prefix = layer_prefix(sorted(tensors), layer, path)
    ours = {}
    for hf_name, our_name in BERT_NAMES.items():
        for part in ("weight", "bias"):
            full = f"{prefix}{hf_name}.{part}"
            if full not in tensors:
                raise WeightsError(f"{path}: missing tensor {full}")
            ours[f"{our_name}.{part}"] = tensors[full]
    d_model = ours["q_proj.weight"].shape[0]
    try:
        config = AttentionConfig(d_model=d_model, num_heads=heads_from_config(path, num_heads))
    except ValueError as err:
        raise WeightsError(f"{path}: {err}") from err
    module = MultiHeadAttention(config)
    load_state(module, ours, str(path))
    return module
