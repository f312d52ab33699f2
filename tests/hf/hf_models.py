"""Tiny Hugging Face models of each family, written as save_pretrained does, and the oracle.

Weights are random with a spread (std 0.2, biases and norms included) that makes every
projection matter: Hugging Face's own init (std 0.02, zero biases) leaves attention nearly
uniform and biases at zero, where a wrong mapping could still pass. `capture` runs the
model's own forward with a hook on one attention module and keeps what it got and gave.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

E, HEADS, LAYERS, VOCAB = 32, 4, 2, 96
SEQ2SEQ_SIZES = {
    "d_model": E, "encoder_layers": LAYERS, "decoder_layers": LAYERS,
    "encoder_attention_heads": HEADS, "decoder_attention_heads": HEADS,
    "encoder_ffn_dim": 2 * E, "decoder_ffn_dim": 2 * E, "vocab_size": VOCAB,
    "max_position_embeddings": 64, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
    "decoder_start_token_id": 2, "dropout": 0.0, "attention_dropout": 0.0,
    "scale_embedding": True,  # so that --text's embed_scale is tested
}  # fmt: skip
WHISPER_FRAMES = 24  # 2 * max_source_positions: the encoder's input (its output: half)


def tiny_config(family: str):
    """A transformers config of d_model 32, 4 heads, 2 layers."""
    import transformers as tf

    if family == "gpt2":
        return tf.GPT2Config(
            n_embd=E, n_head=HEADS, n_layer=LAYERS, vocab_size=VOCAB, n_positions=64,
            add_cross_attention=True, scale_attn_by_inverse_layer_idx=True,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
    if family == "bert":
        return tf.BertConfig(
            hidden_size=E, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=2 * E, vocab_size=VOCAB, max_position_embeddings=64,
        )  # fmt: skip
    if family == "whisper":
        sizes = {k: v for k, v in SEQ2SEQ_SIZES.items() if k != "max_position_embeddings"}
        return tf.WhisperConfig(
            **sizes, num_mel_bins=8, max_source_positions=WHISPER_FRAMES // 2,
            max_target_positions=32,
        )  # fmt: skip
    config_class = {"bart": tf.BartConfig, "mbart": tf.MBartConfig, "marian": tf.MarianConfig}
    return config_class[family](**SEQ2SEQ_SIZES)


def write_tiny_model(family: str, folder: Path, shard: bool = False) -> torch.nn.Module:
    """Build, randomise and save_pretrained (safetensors; sharded if asked) one tiny model."""
    import transformers as tf

    config = tiny_config(family)
    model_class = {
        "gpt2": tf.GPT2LMHeadModel, "bert": tf.BertModel, "bart": tf.BartForConditionalGeneration,
        "mbart": tf.MBartForConditionalGeneration, "marian": tf.MarianMTModel,
        "whisper": tf.WhisperForConditionalGeneration,
    }[family]  # fmt: skip
    torch.manual_seed(sum(map(ord, family)))
    model = model_class(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    kwargs = {"max_shard_size": "40KB"} if shard else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return model


@dataclass
class Captured:
    """One attention module's call inside the model's forward: inputs and output."""

    query: np.ndarray  # (B, L, E) hidden states the module got
    memory: np.ndarray | None  # (B, S, E) encoder states of a cross-attention, else None
    output: np.ndarray  # (B, L, E) what it returned


def attention_module(model: torch.nn.Module, family: str, stack: str, layer: int, attention: str):
    """The transformers submodule of one attention block."""
    if family == "gpt2":
        block = model.transformer.h[layer]
        return block.crossattention if attention == "cross" else block.attn
    if family == "bert":  # BertAttention adds the residual and LayerNorm after output.dense
        return model.encoder.layer[layer].attention.self
    layers = getattr(model.model, stack).layers
    return layers[layer].encoder_attn if attention == "cross" else layers[layer].self_attn


def output_module(model: torch.nn.Module, family: str, module: torch.nn.Module):
    """The module whose output is the block's: BERT's output.dense (before its residual
    and LayerNorm), the attention module itself elsewhere."""
    if family == "bert":
        layer = next(x for x in model.encoder.layer if x.attention.self is module)
        return layer.attention.output.dense
    return module


def capture(model: torch.nn.Module, family: str, module: torch.nn.Module, **inputs) -> Captured:
    """Run model(**inputs) once, keeping the module's inputs and the block's output."""
    seen: dict[str, torch.Tensor] = {}

    def take_inputs(_module, args, kwargs, output):
        seen["query"] = args[0] if args else kwargs["hidden_states"]
        memory = kwargs.get("key_value_states", kwargs.get("encoder_hidden_states"))
        if memory is not None:
            seen["memory"] = memory

    def take_output(_module, args, kwargs, output):
        seen["output"] = output[0] if isinstance(output, tuple) else output

    handles = [
        module.register_forward_hook(take_inputs, with_kwargs=True),
        output_module(model, family, module).register_forward_hook(take_output, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    memory = seen.get("memory")
    return Captured(
        seen["query"].numpy().copy(),
        None if memory is None else memory.numpy().copy(),
        seen["output"].numpy().copy(),
    )


def padded_ids(lengths: list[int], seed: int, pad: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids (B, max length) and the attention mask (1 = real token)."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), max(lengths)), pad, np.int64)
    mask = np.zeros(ids.shape, np.int64)
    for b, n in enumerate(lengths):
        ids[b, :n] = rng.integers(3, VOCAB, n)
        mask[b, :n] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def model_inputs(family: str, self_lengths: list[int], memory_lengths: list[int], seed: int):
    """The forward's keyword arguments and the (B, L), (B, S) masks (True = real token).

    self_lengths pad the stream the block's queries come from (the decoder's, or BERT's
    encoder), memory_lengths the encoder's of a seq2seq model (Whisper's encoder reads
    WHISPER_FRAMES audio frames, never padded).
    """
    ids, mask = padded_ids(self_lengths, seed)
    if family == "bert":
        return {"input_ids": ids, "attention_mask": mask}, mask.bool(), None
    if family == "gpt2":  # its cross-attention reads given encoder states
        rng = np.random.default_rng(seed + 1)
        states = rng.standard_normal((len(self_lengths), max(memory_lengths), E))
        memory_mask = padded_ids(memory_lengths, seed + 2)[1]
        inputs = {"input_ids": ids, "attention_mask": mask, "encoder_attention_mask": memory_mask,
                  "encoder_hidden_states": torch.from_numpy(states.astype(np.float32))}  # fmt: skip
        return inputs, mask.bool(), memory_mask.bool()
    if family == "whisper":
        rng = np.random.default_rng(seed + 1)
        frames = rng.standard_normal((len(self_lengths), 8, WHISPER_FRAMES)).astype(np.float32)
        inputs = {"input_features": torch.from_numpy(frames), "decoder_input_ids": ids,
                  "decoder_attention_mask": mask}  # fmt: skip
        return inputs, mask.bool(), torch.ones(len(self_lengths), WHISPER_FRAMES // 2, dtype=bool)
    source_ids, source_mask = padded_ids(memory_lengths, seed + 1)
    inputs = {"input_ids": source_ids, "attention_mask": source_mask, "decoder_input_ids": ids,
              "decoder_attention_mask": mask}  # fmt: skip
    return inputs, mask.bool(), source_mask.bool()
