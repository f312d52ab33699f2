"""Decoding with a KV cache equals the full causal forward over all the tokens."""

from __future__ import annotations

import pytest
import torch

from mha.model import AttentionConfig, KVCache, seeded_model
from mha.model.attention import allowed_mask, rows_with_keys

CONFIG = AttentionConfig(32, 4, causal=True)
ATOL = 1e-5  # fp32: only the order of accumulation differs (mha.contract.PARITY_TOLERANCE)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def module():
    return seeded_model(CONFIG)


def decode(module, tokens: torch.Tensor, chunks: list[int], use_reference: bool = False):
    """Feed tokens (B, N, E) in chunks of the given lengths; the outputs joined and the cache."""
    cache = KVCache.empty(tokens.shape[0], module.config)
    outputs, start = [], 0
    for length in chunks:
        out, cache = module.forward_step(tokens[:, start : start + length], cache, use_reference)
        assert out.shape == (tokens.shape[0], length, CONFIG.d_model)
        outputs.append(out)
        start += length
    return torch.cat(outputs, dim=1), cache


@pytest.mark.parametrize("use_reference", [False, True], ids=["sdpa", "reference"])
@pytest.mark.parametrize(
    "chunks",
    [[1] * 6, [1, 1, 1], [2, 1, 1], [7, 1, 1, 1], [7, 1, 4], [3, 5, 2], [33, 1, 1]],
    ids=["P0-steps6", "P1-steps2", "P2-steps2", "P7-steps3", "P7-step1-T4", "T3-T5-T2", "P33"],
)
def test_steps_equal_the_full_causal_forward(module, chunks, use_reference):
    tokens = torch.randn(3, sum(chunks), CONFIG.d_model)
    with torch.no_grad():
        got, cache = decode(module, tokens, chunks, use_reference)
        want, _ = module(tokens, use_reference=True)
        keys, values = module.k_proj(tokens), module.v_proj(tokens)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (cache.batch, cache.length) == (3, sum(chunks))
    torch.testing.assert_close(cache.key, keys, atol=ATOL, rtol=0)
    torch.testing.assert_close(cache.value, values, atol=ATOL, rtol=0)


def test_sequences_of_a_batch_decode_independently(module):
    tokens = torch.randn(2, 9, CONFIG.d_model)
    with torch.no_grad():
        both, _ = decode(module, tokens, [4, 1, 4])
        alone, _ = decode(module, tokens[1:], [4, 1, 4])
    torch.testing.assert_close(both[1:], alone, atol=ATOL, rtol=0)


def padded_step(module, pasts: list[torch.Tensor], news: list[torch.Tensor]):
    """One step of ragged sequences, right-padded as the step graph's contract says."""
    e, batch = CONFIG.d_model, len(pasts)
    p, t = max(x.shape[0] for x in pasts), max(x.shape[0] for x in news)
    query = torch.zeros(batch, t, e)
    past_key, past_value = torch.zeros(batch, p, e), torch.zeros(batch, p, e)
    mask = torch.ones(batch, p + t, dtype=torch.bool)
    for b, (old, new) in enumerate(zip(pasts, news, strict=True)):
        past_key[b, : len(old)], past_value[b, : len(old)] = module.k_proj(old), module.v_proj(old)
        query[b, : len(new)] = new
        mask[b, : len(old)] = False
        mask[b, p : p + len(new)] = False
    core = module.step_core(explicit=True)
    return module.step_with(core, query, KVCache(past_key, past_value), mask)


def test_a_padded_ragged_step_equals_each_sequence_alone(module):
    lengths = [(5, 1), (0, 3), (2, 2), (0, 0)]  # (P, T); the last sequence is all padding
    pasts = [torch.randn(p, CONFIG.d_model) for p, _ in lengths]
    news = [torch.randn(t, CONFIG.d_model) for _, t in lengths]
    with torch.no_grad():
        out, keys, values = padded_step(module, pasts, news)
        for b, (old, new) in enumerate(zip(pasts[:3], news[:3], strict=True)):
            cache = KVCache(module.k_proj(old)[None], module.v_proj(old)[None])
            want, grown = module.forward_step(new[None], cache)
            torch.testing.assert_close(out[b, : len(new)], want[0], atol=ATOL, rtol=0)
            torch.testing.assert_close(keys[b, : len(new)], grown.key[0, len(old) :])
            torch.testing.assert_close(values[b, : len(new)], grown.value[0, len(old) :])
    assert torch.isfinite(out).all()
    assert torch.count_nonzero(out[3]) == 0  # no key at all: zero rows, not NaN


def test_causal_mask_is_aligned_at_the_last_key():
    q, k = torch.zeros(1, 2, 8), torch.zeros(1, 5, 8)  # 2 new queries after 3 cached keys
    allowed = allowed_mask(q, k, None, causal=True)[0, 0]
    assert allowed.tolist() == [[True] * 4 + [False], [True] * 5]
    mask = torch.tensor([[True, True, True, True, False]])  # only key 4 (new token 1) kept
    assert rows_with_keys(mask, True, query_length=2)[0, :, 0].tolist() == [False, True]


def test_a_non_causal_block_refuses_to_decode():
    module = seeded_model(AttentionConfig(16, 2))
    with pytest.raises(ValueError, match=r"causal self-attention only: it needs config\.causal"):
        module.forward_step(torch.randn(1, 1, 16), KVCache.empty(1, module.config))


def test_a_block_with_other_key_features_refuses_to_decode():
    module = seeded_model(AttentionConfig(16, 2, kdim=8, causal=True))
    with pytest.raises(ValueError, match="kdim=8 and vdim=16 must equal d_model=16"):
        module.forward_step(torch.randn(1, 1, 16), KVCache.empty(1, module.config))


@pytest.mark.parametrize(
    ("x_new", "message"),
    [
        (torch.randn(2, 1, 32), r"x_new shape \(2, 1, 32\) is not \(B, T, E\) = \(1, T >= 1, 32\)"),
        (torch.randn(1, 1, 16), r"x_new shape \(1, 1, 16\)"),
        (torch.randn(1, 0, 32), r"x_new shape \(1, 0, 32\)"),
    ],
    ids=["batch", "features", "no-token"],
)
def test_a_step_that_does_not_fit_the_cache_is_refused(module, x_new, message):
    with pytest.raises(ValueError, match=message):
        module.forward_step(x_new, KVCache.empty(1, module.config))


def test_cache_construction():
    empty = KVCache.empty(3, CONFIG, dtype=torch.float16)
    assert empty.key.shape == empty.value.shape == (3, 0, 32)
    assert (empty.key.dtype, empty.batch, empty.length) == (torch.float16, 3, 0)
    grown = empty.append(torch.ones(3, 2, 32, dtype=torch.float16), torch.zeros(3, 2, 32).half())
    assert grown.length == 2 and empty.length == 0  # append returns a new cache
    with pytest.raises(ValueError, match=r"got key \(1, 2, 8\) and value \(1, 3, 8\)"):
        KVCache(torch.zeros(1, 2, 8), torch.zeros(1, 3, 8))
