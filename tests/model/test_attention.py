import math

import pytest
import torch

from mha.model import AttentionConfig, MultiHeadAttention, default_model, seeded_model
from mha.model.attention import allowed_mask, rows_with_keys


def manual_attention(module: MultiHeadAttention, query, key, value, key_padding_mask=None):
    """The paper's formula written out per head, independent of the module's code paths."""
    cfg = module.config
    q, k, v = module.q_proj(query), module.k_proj(key), module.v_proj(value)
    heads = []
    for i in range(cfg.num_heads):
        sl = slice(i * cfg.head_dim, (i + 1) * cfg.head_dim)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(cfg.head_dim)
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, :], float("-inf"))
        if cfg.causal:
            causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        heads.append(torch.softmax(scores, -1) @ v[..., sl])
    return module.out_proj(torch.cat(heads, -1))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_self_attention_matches_the_formula(causal):
    module = seeded_model(AttentionConfig(64, 4, causal=causal))
    x = torch.randn(3, 11, 64)
    mask = torch.zeros(3, 11, dtype=torch.bool)
    mask[1, 7:] = True
    with torch.no_grad():
        fast, _ = module(x, key_padding_mask=mask)
        ref, _ = module(x, key_padding_mask=mask, use_reference=True)
        want = manual_attention(module, x, x, x, mask)
    torch.testing.assert_close(fast, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(ref, want, atol=1e-6, rtol=0)


def test_cross_attention_with_kdim_vdim():
    module = seeded_model(AttentionConfig(32, 2, kdim=24, vdim=40))
    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 9, 24), torch.randn(2, 9, 40)
    with torch.no_grad():
        out, weights = module(q, k, v, need_weights=True)
        want = manual_attention(module, q, k, v)
    assert out.shape == (2, 5, 32) and weights is not None and weights.shape == (2, 2, 5, 9)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 5))


def test_fully_padded_sample_gives_zero_rows_and_weights():
    module = default_model()
    x = torch.randn(2, 6, 512)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1] = True
    with torch.no_grad():
        out, weights = module(x, key_padding_mask=mask, need_weights=True)
        fast, _ = module(x, key_padding_mask=mask)
    assert weights is not None
    assert torch.count_nonzero(out[1]) == 0 and torch.count_nonzero(weights[1]) == 0
    assert torch.count_nonzero(fast[1]) == 0 and torch.isfinite(fast).all()
    assert torch.count_nonzero(out[0]) == out[0].numel()


def test_causal_cross_attention_is_refused():
    module = seeded_model(AttentionConfig(16, 2, causal=True))
    with pytest.raises(ValueError, match="causal=True is defined for self-attention only"):
        module(torch.randn(1, 2, 16), torch.randn(1, 3, 16))


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (torch.zeros(2, 5, dtype=torch.int64), "key_padding_mask must be bool"),
        (torch.zeros(2, 4, dtype=torch.bool), r"shape \(2, 4\) does not match \(B, S\) = \(2, 5\)"),
    ],
    ids=["int-mask", "wrong-length"],
)
def test_bad_mask_is_refused(mask, message):
    module = seeded_model(AttentionConfig(16, 2))
    with pytest.raises(ValueError, match=message):
        module(torch.randn(2, 5, 16), key_padding_mask=mask)


def test_default_model_is_deterministic():
    a, b = default_model(), default_model()
    assert a.config == AttentionConfig(512, 8)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb), name
    assert not torch.equal(default_model(seed=1).q_proj.weight, a.q_proj.weight)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_rows_with_keys_agrees_with_the_full_mask(causal):
    """The zeroing reads the (B, S) mask alone; it must pick the rows the (B, 1, L, S) mask
    leaves without any key."""
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[1, 2:] = True
    mask[2] = True
    mask[3, :4] = True  # left padding: with causal, rows 0..3 see no key
    q = torch.zeros(4, 6, 8)
    allowed = allowed_mask(q, q, mask, causal)  # (B, 1, L, S)
    want = allowed.any(-1).transpose(1, 2)  # (B, L, 1)
    got = rows_with_keys(mask, causal).expand_as(want)
    assert torch.equal(got, want)


def test_forward_with_runs_the_given_core():
    module = seeded_model(AttentionConfig(32, 4))
    x = torch.randn(2, 5, 32)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1] = True
    seen = []

    def core(q, k, v, key_padding_mask):
        seen.append((q.shape, k.shape, key_padding_mask))
        return module.core(explicit=True)(q, k, v, key_padding_mask)

    with torch.no_grad():
        out, weights = module.forward_with(core, x, x, x, mask)
        want, want_weights = module(x, key_padding_mask=mask, need_weights=True)
    assert seen == [((2, 5, 32), (2, 5, 32), mask)]
    assert torch.equal(out, want) and weights is not None and torch.equal(weights, want_weights)
    assert torch.count_nonzero(out[1]) == 0
