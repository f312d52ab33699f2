"""Where an export's weights come from: embedded default, our file, BERT-style checkpoint,
or one attention block of a Hugging Face checkpoint folder."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mha.export.options import ExportOptions
from mha.model import (
    AttentionConfig,
    LayerChoice,
    MultiHeadAttention,
    from_bert,
    from_hf,
    load,
    seeded_model,
    state_sha256,
)
from mha.model.weights import file_sha256


@dataclass(frozen=True)
class WeightsSource:
    """A loaded fp32 module and a description of its origin."""

    module: MultiHeadAttention
    description: str
    sha256: str
    record: dict[str, Any] | None = None  # mha.json's `source` (a Hugging Face checkpoint)


def resolve_source(
    options: ExportOptions, module: MultiHeadAttention | None = None
) -> tuple[ExportOptions, WeightsSource]:
    """The export's weights, and its options with causal settled by a checkpoint's layer.

    A Hugging Face layer is causal when the checkpoint says so (a decoder's self-attention);
    a KV-cache step graph decodes causal self-attention only, so a bidirectional layer
    (an encoder's) is refused for it.
    """
    if module is not None:
        return options, from_module(module, options.causal)
    if options.hf is None:
        return options, load_source(options, options.causal)
    choice = LayerChoice(options.hf_layer, options.hf_attention, options.hf_stack)
    block = from_hf(options.hf, choice)
    causal = block.found.causal
    if options.kv_cache and options.self_attention and not causal:
        raise ValueError(
            f"--kv-cache decodes causal self-attention; {block.description} of {options.hf} "
            "is bidirectional (export it without --kv-cache)"
        )
    options = dataclasses.replace(options, causal=causal)
    digest = state_sha256(block.module)
    return options, WeightsSource(block.module, block.description, digest, block.source())


def load_source(options: ExportOptions, causal: bool) -> WeightsSource:
    """Build the fp32 eager module from the options' weight source."""
    if options.weights is not None:
        module = load(options.weights)
        desc, digest = f"safetensors:{options.weights.name}", file_sha256(options.weights)
    elif options.bert is not None:
        module = from_bert(options.bert, options.bert_layer, num_heads=options.num_heads)
        desc = f"bert:{options.bert.name}#layer{options.bert_layer}"
        digest = file_sha256(options.bert)
    else:
        assert options.num_heads is not None  # ExportOptions requires it without --bert
        config = AttentionConfig(
            options.d_model, options.num_heads, options.kdim, options.vdim, options.bias
        )
        module = seeded_model(config, options.seed)
        desc, digest = f"seeded:{options.seed}", state_sha256(module)
    return WeightsSource(with_causal(module, causal), desc, digest)


def from_module(module: MultiHeadAttention, causal: bool) -> WeightsSource:
    """Wrap a module given through the Python API (e.g. from_torch(nn.MultiheadAttention))."""
    return WeightsSource(with_causal(module, causal), "module", state_sha256(module))


def with_causal(module: MultiHeadAttention, causal: bool) -> MultiHeadAttention:
    """The same weights with the export's causal setting."""
    if module.config.causal == causal:
        return module.eval()
    cfg = module.config
    config = AttentionConfig(cfg.d_model, cfg.num_heads, cfg.kdim, cfg.vdim, cfg.bias, causal)
    twin = MultiHeadAttention(config)
    twin.load_state_dict(module.state_dict())
    return twin.eval()
