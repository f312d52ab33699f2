"""The traced module is the model's own forward with its attention core swapped."""

from __future__ import annotations

import pytest
import torch

from mha.export.graph import build_graph
from mha.model import AttentionConfig, seeded_model

KINDS = {
    "self": AttentionConfig(32, 4),
    "cross": AttentionConfig(32, 4, kdim=24, vdim=40),
    "causal": AttentionConfig(32, 4, causal=True),
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused-op", "reference-core"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_export_graph_run_eagerly_is_the_model(kind, fused):
    config = KINDS[kind]
    module = seeded_model(config)
    self_attention = kind != "cross"
    source = 5 if self_attention else 9
    query = torch.randn(3, 5, 32)
    key, value = torch.randn(3, source, config.key_dim), torch.randn(3, source, config.value_dim)
    mask = torch.zeros(3, source, dtype=torch.bool)
    mask[1, 3:] = True
    mask[2] = True  # a fully padded sample: all-zero rows in both outputs
    graph = build_graph(module, self_attention, weights=True, fused=fused)
    inputs = (query, mask) if self_attention else (query, key, value, mask)
    with torch.no_grad():
        out, weights = graph(*inputs)
        if self_attention:
            want, want_weights = module(query, key_padding_mask=mask, need_weights=True)
        else:
            want, want_weights = module(query, key, value, key_padding_mask=mask, need_weights=True)
    assert torch.equal(out, want) and torch.equal(weights, want_weights)
    assert torch.count_nonzero(out[2]) == 0 and torch.count_nonzero(weights[2]) == 0
    assert graph.input_names() == (
        ["query", "key_padding_mask"]
        if self_attention
        else ["query", "key", "value", "key_padding_mask"]
    )
    assert graph.output_names() == ["output", "attention_weights"]
