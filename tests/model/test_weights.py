import json
import math

import pytest
import torch
from safetensors.torch import save_file

from mha.model import (
    AttentionConfig,
    WeightsError,
    from_bert,
    from_torch,
    load,
    save,
    seeded_model,
)


def torch_mha(embed, heads, kdim=None, vdim=None, bias=True):
    torch.manual_seed(0)
    m = torch.nn.MultiheadAttention(embed, heads, bias=bias, kdim=kdim, vdim=vdim, batch_first=True)
    with torch.no_grad():  # torch initialises biases to zero; make them matter
        for name, p in m.named_parameters():
            if "bias" in name:
                p.uniform_(-0.5, 0.5)
    return m.eval()


@pytest.mark.parametrize(
    ("kdim", "vdim", "bias"),
    [(None, None, True), (None, None, False), (24, 40, True)],
    ids=["packed-in-proj", "packed-no-bias", "separate-kdim-vdim"],
)
def test_import_from_torch_equals_torch(kdim, vdim, bias):
    theirs = torch_mha(32, 4, kdim, vdim, bias)
    ours = from_torch(theirs).eval()
    q = torch.randn(3, 7, 32)
    k = torch.randn(3, 9, kdim or 32)
    v = torch.randn(3, 9, vdim or 32)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, 5:] = True
    with torch.no_grad():
        want, want_w = theirs(q, k, v, key_padding_mask=mask, average_attn_weights=False)
        got, got_w = ours(q, k, v, key_padding_mask=mask, need_weights=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=0)


def test_torch_extras_are_refused():
    m = torch.nn.MultiheadAttention(16, 2, add_bias_kv=True)
    with pytest.raises(WeightsError, match="add_bias_kv"):
        from_torch(m)


def test_bert_import_equals_reference(tmp_path, bert_checkpoint):
    path = tmp_path / "model.safetensors"
    t = bert_checkpoint(path)
    module = from_bert(path, layer=1).eval()
    assert module.config == AttentionConfig(32, 4)
    x = torch.randn(2, 6, 32)
    base = "bert.encoder.layer.1.attention."

    def lin(name, inp):
        return inp @ t[f"{base}{name}.weight"].T + t[f"{base}{name}.bias"]

    def heads(y):
        return y.view(2, 6, 4, 8).transpose(1, 2)

    q, k, v = heads(lin("self.query", x)), heads(lin("self.key", x)), heads(lin("self.value", x))
    ctx = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
    want = lin("output.dense", ctx.transpose(1, 2).reshape(2, 6, 32))
    with torch.no_grad():
        got, _ = module(x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_bert_errors_name_the_problem(tmp_path, bert_checkpoint):
    path = tmp_path / "model.safetensors"
    bert_checkpoint(path, layers=1)
    with pytest.raises(
        WeightsError, match=r"layer\.3\.attention\.self\.query\.weight.*layers found: \[0\]"
    ):
        from_bert(path, layer=3)
    with pytest.raises(WeightsError, match="d_model=32 is not divisible by num_heads=5"):
        from_bert(path, num_heads=5)


def test_save_load_round_trip(tmp_path):
    module = seeded_model(AttentionConfig(32, 4, kdim=16, bias=False))
    save(module, tmp_path / "w.safetensors")
    back = load(tmp_path / "w.safetensors")
    assert back.config == module.config
    for (name, a), b in zip(module.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_unreadable_and_wrong_shaped_checkpoints(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00not a safetensors file")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load(junk)
    with pytest.raises(WeightsError, match="no such file"):
        load(tmp_path / "missing.safetensors")
    module = seeded_model(AttentionConfig(32, 4))
    path = tmp_path / "w.safetensors"
    save(module, path)
    tensors = {k: v.clone() for k, v in module.state_dict().items()}
    tensors["k_proj.weight"] = torch.zeros(32, 16)
    meta = {"mha.config": json.dumps({"d_model": 32, "num_heads": 4})}
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(
        WeightsError, match=r"k_proj.weight has shape \(32, 16\), expected \(32, 32\)"
    ):
        load(path)
