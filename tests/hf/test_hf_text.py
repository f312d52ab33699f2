"""`mha infer --text`'s layer input, made with numpy from the checkpoint, against transformers.

all-MiniLM-L6-v2 (BERT) tokenized by its tokenizer.json and embedded must give what
transformers' BertModel hands its layer-0 attention for the same sentence; BART's and
mBART's embeddings (both stacks) what their layer-0 attention gets for the same ids.
"""

from __future__ import annotations

import numpy as np
import pytest
from hf_models import attention_module, capture, model_inputs

from mha.client.tensors import Tensors, read_json
from mha.client.text import bart_rows, text_input

ATOL = 1e-5  # fp32: our LayerNorm in float64 against torch's in float32
SENTENCE = "Attention maps show which words look at which."


def test_minilm_layer_input_equals_transformers(minilm_folder):
    import transformers

    ours = text_input(minilm_folder, SENTENCE)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_folder)
    encoded = tokenizer(SENTENCE, return_tensors="pt")
    assert ours.tokens == tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])
    model = transformers.AutoModel.from_pretrained(minilm_folder).eval()
    captured = capture(model, "bert", attention_module(model, "bert", "encoder", 0, "self"),
                       **encoded)  # fmt: skip
    assert ours.query.shape == captured.query.shape == (1, len(ours.tokens), 384)
    np.testing.assert_allclose(ours.query, captured.query, rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", ["bart", "mbart"])
@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_bart_layer_input_equals_transformers(tiny_models, family, stack):
    folder, model = tiny_models[family]
    inputs, _, _ = model_inputs(family, [7], [9], seed=4)
    captured = capture(model, family, attention_module(model, family, stack, 0, "self"), **inputs)
    ids = inputs["input_ids" if stack == "encoder" else "decoder_input_ids"][0].numpy()
    rows = bart_rows(Tensors(folder), read_json(folder / "config.json"), ids, stack,
                     pre_norm=family == "mbart")  # fmt: skip
    assert read_json(folder / "config.json")["scale_embedding"] is True
    np.testing.assert_allclose(rows[None], captured.query, rtol=0, atol=ATOL)
    assert np.abs(captured.query).max() > 0.5
