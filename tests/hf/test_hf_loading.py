"""from_hf's module against the Hugging Face model's own attention, and what it refuses.

Every family, stack and kind of attention, both layers: the module built from the saved
checkpoint is fed what the transformers module got inside its model's forward (padded
batches, masks made by transformers) and must give what it gave, on every real row.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_models import attention_module, capture, model_inputs
from safetensors.torch import load_file, save_file

from mha.model import LayerChoice, WeightsError, from_hf

ATOL = 1e-5
# (family, stack, attention, layer): GPT-2's two layers differ in scale (layer 1 folds
# scale_attn_by_inverse_layer_idx's 1/2 into W^Q); elsewhere layer 1, not the first.
BLOCKS = [
    ("gpt2", "decoder", "self", 0), ("gpt2", "decoder", "self", 1),
    ("gpt2", "decoder", "cross", 1), ("bert", "encoder", "self", 1),
    *[(f, s, a, 1) for f in ("bart", "mbart", "marian", "whisper")
      for s, a in (("decoder", "self"), ("decoder", "cross"), ("encoder", "self"))],
]  # fmt: skip


def eager_rows(block, captured, self_mask, memory_mask, stack, attention) -> np.ndarray:
    """The module's output on the captured inputs, at the real query rows (N, E)."""
    query = torch.from_numpy(captured.query)
    if attention == "cross":
        memory = torch.from_numpy(captured.memory)
        out, _ = block.module(query, memory, memory, key_padding_mask=~memory_mask)
        rows = self_mask
    else:
        rows = memory_mask if stack == "encoder" else self_mask
        out, _ = block.module(query, key_padding_mask=~rows)
    return out.detach().numpy()[rows.numpy()]


@pytest.mark.parametrize(
    ("family", "stack", "attention", "layer"), BLOCKS, ids=["-".join(map(str, b)) for b in BLOCKS]
)
def test_the_module_gives_what_transformers_gives(tiny_models, family, stack, attention, layer):
    folder, model = tiny_models[family]
    inputs, self_mask, memory_mask = model_inputs(family, [5, 3, 4], [6, 4, 2], seed=layer)
    if family == "bert":
        memory_mask = self_mask  # BERT's stack is the encoder the queries come from
    hf_module = attention_module(model, family, stack, layer, attention)
    captured = capture(model, family, hf_module, **inputs)
    block = from_hf(folder, LayerChoice(layer, attention, None if family == "bert" else stack))
    assert block.found.causal == (stack == "decoder" and attention == "self")
    rows = self_mask.numpy() if attention == "cross" or stack == "decoder" else memory_mask.numpy()
    want = captured.output[rows]
    got = eager_rows(block, captured, self_mask, memory_mask, stack, attention)
    assert np.abs(want).max() > 0.1  # the block does something measurable
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_source_names_the_block_and_hashes_every_file_read(tiny_models):
    folder, _ = tiny_models["bart"]  # written as shards with an index
    block = from_hf(folder, LayerChoice(1, "cross"))
    source = block.source()
    assert source["architecture"] == "BartForConditionalGeneration"
    assert (source["model_type"], source["stack"], source["layer"]) == ("bart", "decoder", 1)
    assert source["attention"] == "cross" and source["causal"] is False
    assert "config.json" in source["files"] and "model.safetensors.index.json" in source["files"]
    shards = [f for f in source["files"] if f.startswith("model-")]
    assert shards and len(shards) < len(list(folder.glob("model-*.safetensors")))
    assert all(len(digest) == 64 for digest in source["files"].values())


def write_config(folder: Path, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"x": torch.zeros(1)}, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize(
    ("config", "needles"),
    [
        ({"model_type": "t5", "d_model": 32}, ["t5", "relative position bias"]),
        ({"model_type": "llama", "num_attention_heads": 8, "num_key_value_heads": 2},
         ["rotary", "grouped-query", "num_key_value_heads=2"]),
        ({"model_type": "bloom"}, ["ALiBi"]),
        ({"model_type": "mpt"}, ["ALiBi"]),
        ({"model_type": "bert", "position_embedding_type": "relative_key"}, ["relative_key"]),
        ({"model_type": "albert"}, ["model_type 'albert'", "supported: gpt2"]),
    ],
    ids=["t5", "llama", "bloom", "mpt", "bert-relative", "unknown"],
)  # fmt: skip
def test_other_attention_is_refused_naming_what_it_has(tmp_path, config, needles):
    folder = write_config(tmp_path / "ckpt", **config)
    with pytest.raises(WeightsError) as err:
        from_hf(folder)
    assert "config.json" in str(err.value)
    for needle in needles:
        assert needle in str(err.value)


def test_bad_files_are_named_with_the_key(tiny_models, tmp_path):
    folder, _ = tiny_models["whisper"]
    copy = tmp_path / "whisper"
    shutil.copytree(folder, copy)
    with pytest.raises(WeightsError, match=r"layer 2 is out of range: the whisper decoder has 2"):
        from_hf(copy, LayerChoice(2))
    tensors = load_file(str(copy / "model.safetensors"))
    name = "model.decoder.layers.1.self_attn.v_proj.bias"
    save_file({k: v for k, v in tensors.items() if k != name}, str(copy / "model.safetensors"))
    with pytest.raises(WeightsError, match=rf"model.safetensors: no tensor '{name}'"):
        from_hf(copy, LayerChoice(1))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "d_model": "wide"}))
    with pytest.raises(WeightsError, match=r"config.json: 'd_model' must be a positive integer"):
        from_hf(copy)
    (copy / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match=r"config.json: not valid JSON"):
        from_hf(copy)
    (copy / "config.json").write_text(json.dumps(config))
    (copy / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"no model.safetensors nor model.safetensors.index"):
        from_hf(copy)


def test_a_broken_shard_index_is_named(tiny_models, tmp_path):
    folder, _ = tiny_models["bart"]
    copy = tmp_path / "bart"
    shutil.copytree(folder, copy)
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "model-99-of-99.safetensors"
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=rf"weight_map\['{first}'\] names model-99-of-99"):
        from_hf(copy)
    (copy / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(WeightsError, match=r"index.json: no 'weight_map'"):
        from_hf(copy)
