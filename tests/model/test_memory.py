"""Cross-attention over a projected memory equals the cross-attention forward."""

from __future__ import annotations

import pytest
import torch

from mha.model import AttentionConfig, KVCache, seeded_model

ATOL = 1e-5  # fp32: only the order of accumulation differs (mha.contract.PARITY_TOLERANCE)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.mark.parametrize("use_reference", [False, True], ids=["sdpa", "reference"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize(("s", "t"), [(1, 1), (7, 4), (33, 1)], ids=["S1-T1", "S7-T4", "S33-T1"])
def test_forward_memory_equals_the_cross_forward(use_reference, bias, s, t):
    module = seeded_model(AttentionConfig(32, 4, kdim=24, vdim=40, bias=bias))
    query, key, value = torch.randn(3, t, 32), torch.randn(3, s, 24), torch.randn(3, s, 40)
    mask = torch.zeros(3, s, dtype=torch.bool)
    mask[1, (s + 1) // 2 :] = True  # padded memory
    mask[2] = True  # fully padded: zero rows
    with torch.no_grad():
        memory = module.project_memory(key, value)
        got = module.forward_memory(query, memory, mask, use_reference)
        want, _ = module(query, key, value, mask, use_reference=True)
    assert memory.key.shape == memory.value.shape == (3, s, 32)
    torch.testing.assert_close(memory.key, module.k_proj(key), atol=0, rtol=0)
    torch.testing.assert_close(memory.value, module.v_proj(value), atol=0, rtol=0)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert torch.count_nonzero(got[2]) == 0


def test_forward_memory_without_a_mask_attends_every_row():
    module = seeded_model(AttentionConfig(16, 2, kdim=8, vdim=8))
    query, key, value = torch.randn(2, 3, 16), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    with torch.no_grad():
        got = module.forward_memory(query, module.project_memory(key, value))
        want, _ = module(query, key, value)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("config", "query", "mask", "message"),
    [
        (AttentionConfig(16, 2, causal=True), (1, 2, 16), None, "needs config.causal=False"),
        (AttentionConfig(16, 2), (1, 2, 8), None, r"is not \(B, T, E\)"),
        (AttentionConfig(16, 2), (2, 2, 16), None, "for a memory of 1 sequence"),
        (AttentionConfig(16, 2), (1, 2, 16), (1, 4), "does not match"),
    ],
    ids=["causal", "width", "batch", "mask"],
)
def test_what_forward_memory_refuses(config, query, mask, message):
    module = seeded_model(config)
    memory = KVCache(torch.randn(1, 5, 16), torch.randn(1, 5, 16))
    pad = None if mask is None else torch.zeros(mask, dtype=torch.bool)
    with pytest.raises(ValueError, match=message):
        module.forward_memory(torch.randn(query), memory, pad)
