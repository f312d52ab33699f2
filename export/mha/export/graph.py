"""The traced modules: the model's own forward (or decoding step), its core swapped for the
fused op."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mha import contract
from mha.export import fused_ops, step_ops  # noqa: F401  (register torch.ops.mha.*)
from mha.model.attention import MultiHeadAttention
from mha.model.kv_cache import KVCache


class ExportGraph(nn.Module):
    """The exported graph's forward, with the tensor contract's input and output names.

    It runs MultiHeadAttention.forward_with, so projections, W^O and the zeroing of rows
    with no key are the model's own code. fused=True makes the attention core
    torch.ops.mha.attention (one fused node after translation); fused=False keeps the
    model's explicit reference core (the `none` target).
    """

    def __init__(
        self, mha: MultiHeadAttention, self_attention: bool, weights: bool, fused: bool
    ) -> None:
        super().__init__()
        self.mha = mha
        self.self_attention = self_attention
        self.weights = weights
        self.fused = fused

    def graph_outputs(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor
    ) -> tuple[Tensor, ...]:
        """(output,) or (output, attention_weights)."""
        out, weights = self.mha.forward_with(self.core, query, key, value, key_padding_mask)
        return (out,) if weights is None else (out, weights)

    def core(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """This export's attention core: (B, L, E) heads and (B, h, L, S) weights or None."""
        cfg = self.mha.config
        if not self.fused:
            heads, weights = self.mha.core(explicit=True)(q, k, v, key_padding_mask)
            return heads, weights if self.weights else None
        if self.weights:
            return torch.ops.mha.attention_weights(
                q, k, v, key_padding_mask, cfg.num_heads, cfg.causal
            )
        heads = torch.ops.mha.attention(q, k, v, key_padding_mask, cfg.num_heads, cfg.causal)
        return heads, None

    def input_names(self) -> list[str]:
        """Graph input names, in order."""
        return list(contract.input_names(self.self_attention))

    def output_names(self) -> list[str]:
        """Graph output names, in order."""
        return list(contract.output_names(self.weights))


class SelfAttentionGraph(ExportGraph):
    """Inputs query (B, L, E) and key_padding_mask (B, L)."""

    def forward(self, query: Tensor, key_padding_mask: Tensor) -> tuple[Tensor, ...]:
        return self.graph_outputs(query, query, query, key_padding_mask)


class CrossAttentionGraph(ExportGraph):
    """Inputs query (B, L, E), key (B, S, kdim), value (B, S, vdim), key_padding_mask (B, S)."""

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor
    ) -> tuple[Tensor, ...]:
        return self.graph_outputs(query, key, value, key_padding_mask)


def build_graph(
    mha: MultiHeadAttention, self_attention: bool, weights: bool, fused: bool
) -> ExportGraph:
    """The traced module for one export."""
    cls = SelfAttentionGraph if self_attention else CrossAttentionGraph
    return cls(mha, self_attention, weights, fused).eval()


class StepGraph(nn.Module):
    """A KV-cache export's step graph: MultiHeadAttention.step_with, the contract's step names.

    Inputs query (B, T, E), past_key and past_value (B, P, E), key_padding_mask (B, P + T);
    outputs output (B, T, E), new_key and new_value (B, T, E). fused=True makes the step core
    torch.ops.mha.attention_step (one fused node after translation); fused=False keeps the
    model's explicit step core (the `none` target).
    """

    def __init__(self, mha: MultiHeadAttention, fused: bool) -> None:
        super().__init__()
        self.mha = mha
        self.fused = fused

    def forward(
        self, query: Tensor, past_key: Tensor, past_value: Tensor, key_padding_mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        past = KVCache(past_key, past_value)
        return self.mha.step_with(self.core, query, past, key_padding_mask)

    def core(
        self, q: Tensor, k: Tensor, v: Tensor, past: KVCache, key_padding_mask: Tensor | None
    ) -> Tensor:
        """This export's step core: the heads (B, T, E) of the new tokens."""
        if not self.fused:
            return self.mha.step_core(explicit=True)(q, k, v, past, key_padding_mask)
        assert key_padding_mask is not None  # a graph input: always given
        heads = self.mha.config.num_heads
        return torch.ops.mha.attention_step(q, k, v, past.key, past.value, key_padding_mask, heads)

    def input_names(self) -> list[str]:
        """Graph input names, in order."""
        return [t.name for t in contract.step_inputs()]

    def output_names(self) -> list[str]:
        """Graph output names, in order."""
        return [t.name for t in contract.step_outputs()]


class MemoryStepGraph(ExportGraph):
    """A memory export's step graph: MultiHeadAttention.memory_with, the contract's names.

    Inputs query (B, T, E), memory_key and memory_value (B, S, E) (projected by memory.onnx),
    key_padding_mask (B, S); output (B, T, E). The core is the cross export's (ExportGraph.core:
    torch.ops.mha.attention, one fused node), fed the memory instead of projecting K and V.
    """

    def __init__(self, mha: MultiHeadAttention, fused: bool) -> None:
        super().__init__(mha, self_attention=False, weights=False, fused=fused)

    def forward(
        self, query: Tensor, memory_key: Tensor, memory_value: Tensor, key_padding_mask: Tensor
    ) -> Tensor:
        memory = KVCache(memory_key, memory_value)
        return self.mha.memory_with(self.core, query, memory, key_padding_mask)[0]

    def input_names(self) -> list[str]:
        """Graph input names, in order."""
        return [t.name for t in contract.memory_step_inputs()]

    def output_names(self) -> list[str]:
        """Graph output names, in order."""
        return [t.name for t in contract.memory_step_outputs()]


class MemoryGraph(nn.Module):
    """memory.onnx: MultiHeadAttention.project_memory, key (B, S, kdim) and value (B, S, vdim)
    in, memory_key and memory_value (B, S, E) out; no attention."""

    def __init__(self, mha: MultiHeadAttention) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        memory = self.mha.project_memory(key, value)
        return memory.key, memory.value

    def input_names(self) -> list[str]:
        """Graph input names, in order."""
        return [t.name for t in contract.memory_projection_inputs()]

    def output_names(self) -> list[str]:
        """Graph output names, in order."""
        return [t.name for t in contract.memory_projection_outputs()]
