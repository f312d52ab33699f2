"""Where an export's weights come from: embedded default, our file, BERT-style checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

from mha.export.options import ExportOptions
from mha.model import (
    AttentionConfig,
    MultiHeadAttention,
    from_bert,
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
