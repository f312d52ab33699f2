"""One attention block of a Hugging Face checkpoint folder as our module (no transformers).

`from_hf(folder, LayerChoice(layer, "self" | "cross", stack))` reads config.json, refuses
attention this module cannot compute (mha.model.hf_refusals), finds the block's tensors
(mha.model.hf_layers), folds a score scale other than 1/sqrt(head_dim) into W^Q, and loads
them. `source` records where the weights came from, for mha.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mha.model.attention import MultiHeadAttention
from mha.model.checkpoint import CONFIG_FILE, Checkpoint
from mha.model.config import AttentionConfig
from mha.model.hf_layers import FAMILIES, FoundLayer, LayerChoice, fold_scale
from mha.model.hf_refusals import refusal
from mha.model.weights import WeightsError, load_state


@dataclass(frozen=True)
class HFBlock:
    """The loaded module and what it is: family, stack, layer, attention, files' sha256."""

    module: MultiHeadAttention
    found: FoundLayer
    architecture: str
    files: dict[str, str]  # file name -> sha256

    @property
    def description(self) -> str:
        """e.g. hf:bart decoder layer 1 cross-attention."""
        f = self.found
        return f"hf:{f.family} {f.stack} layer {f.layer} {f.attention}-attention"

    def source(self) -> dict[str, Any]:
        """mha.json's `source` object."""
        f = self.found
        return {
            "format": "huggingface",
            "architecture": self.architecture,
            "model_type": f.family,
            "stack": f.stack,
            "layer": f.layer,
            "attention": f.attention,
            "causal": f.causal,
            "files": self.files,
        }


def family_of(checkpoint: Checkpoint) -> str:
    """The checkpoint's model_type, refused with the reason when its attention is not ours."""
    config_path = checkpoint.folder / CONFIG_FILE
    reason = refusal(checkpoint.config)
    if reason:
        raise WeightsError(f"{config_path}: {reason}")
    model_type = checkpoint.setting("model_type", required=True)
    if model_type not in FAMILIES:
        raise WeightsError(
            f"{config_path}: model_type {model_type!r} is not one mha reads; "
            f"supported: {', '.join(FAMILIES)}"
        )
    return str(model_type)


def from_hf(folder: Path, choice: LayerChoice | None = None) -> HFBlock:
    """Load one attention block of the checkpoint in `folder` (default: layer 0's self)."""
    choice = choice or LayerChoice()
    checkpoint = Checkpoint(folder)
    found = FAMILIES[family_of(checkpoint)](checkpoint, choice)
    module = module_of(found, str(folder))
    architectures = checkpoint.setting("architectures") or [found.family]
    return HFBlock(module, found, str(architectures[0]), checkpoint.sha256())


def module_of(found: FoundLayer, source: str) -> MultiHeadAttention:
    """Our module with the block's weights, its scale folded into W^Q."""
    try:
        config = AttentionConfig(found.d_model, found.num_heads, causal=found.causal)
    except ValueError as err:
        raise WeightsError(f"{source}: {err}") from err
    module = MultiHeadAttention(config)
    load_state(module, fold_scale(found.tensors, found.scale, config.head_dim), source)
    return module.eval()
