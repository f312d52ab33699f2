"""The traced graph's signature, read from mha.contract: sizes, example inputs, dynamic axes."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mha import contract
from mha.export.options import EXPORT_SHAPE
from mha.model.config import AttentionConfig


def contract_dims(config: AttentionConfig) -> contract.Dims:
    """The contract's fixed sizes of one model: E = d_model, h = num_heads, kdim, vdim."""
    return contract.Dims(
        d_model=config.d_model,
        num_heads=config.num_heads,
        kdim=config.key_dim,
        vdim=config.value_dim,
    )


def example_inputs(
    config: AttentionConfig, self_attention: bool, dtype: torch.dtype
) -> tuple[Tensor, ...]:
    """Trace-time inputs of EXPORT_SHAPE in graph input order (never used for parity)."""
    dims = contract_dims(config)
    tensors = []
    for t in contract.inputs(self_attention):
        shape = contract.concrete_shape(t, dims, self_attention, EXPORT_SHAPE)
        if t.datatype == contract.BOOL:  # key_padding_mask: nothing padded
            tensors.append(torch.zeros(shape, dtype=torch.bool))
        else:
            tensors.append(torch.randn(shape, dtype=dtype))
    return tuple(tensors)


def dynamic_shapes(config: AttentionConfig, self_attention: bool) -> tuple[dict[int, Any], ...]:
    """Per graph input, its named dynamic axes: B, L and S independent (S is L in self)."""
    dims = contract_dims(config)
    axes = {name: torch.export.Dim(name) for name in contract.DYNAMIC_AXES}
    return tuple(
        {
            i: axes[axis]
            for i, axis in enumerate(contract.symbolic_shape(t, dims, self_attention))
            if isinstance(axis, str)
        }
        for t in contract.inputs(self_attention)
    )


def io_shapes(config: AttentionConfig, self_attention: bool) -> dict[str, list[str | int]]:
    """The contract's shapes of every graph input and output, dynamic axes by name."""
    dims = contract_dims(config)
    tensors = (*contract.inputs(self_attention), *contract.outputs(attention_weights=True))
    return {t.name: contract.symbolic_shape(t, dims, self_attention) for t in tensors}
