"""The traced graph's signature, read from mha.contract: sizes, example inputs, dynamic axes."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mha import contract
from mha.export.options import EXPORT_SHAPE, MEMORY_EXPORT_SHAPE, STEP_EXPORT_SHAPE
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
    tensors = contract.inputs(self_attention)
    return trace_tensors(tensors, contract_dims(config), self_attention, EXPORT_SHAPE, dtype)


def step_example_inputs(config: AttentionConfig, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """Trace-time inputs of a step graph, of STEP_EXPORT_SHAPE (never used for parity)."""
    dims = contract_dims(config)
    return trace_tensors(contract.step_inputs(), dims, True, STEP_EXPORT_SHAPE, dtype)


def trace_tensors(
    tensors: tuple[contract.Tensor, ...],
    dims: contract.Dims,
    self_attention: bool,
    sizes: dict[str, int],
    dtype: torch.dtype,
) -> tuple[Tensor, ...]:
    """Random float tensors and all-False masks (nothing padded) of the given sizes."""
    arrays = []
    for t in tensors:
        shape = contract.concrete_shape(t, dims, self_attention, sizes)
        if t.datatype == contract.BOOL:  # key_padding_mask: nothing padded
            arrays.append(torch.zeros(shape, dtype=torch.bool))
        else:
            arrays.append(torch.randn(shape, dtype=dtype))
    return tuple(arrays)


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


def step_dynamic_shapes(config: AttentionConfig) -> tuple[dict[int, Any], ...]:
    """Per step graph input, its dynamic axes: B, T and P named; C (= P + T) left to the tracer.

    torch.export cannot name C: it is the sum of two dims, and the graph relates them (the
    mask is read against concat(past, new)).
    """
    dims = contract_dims(config)
    axes: dict[str, Any] = {name: torch.export.Dim(name) for name in ("B", "T", "P")}
    axes["C"] = torch.export.Dim.AUTO
    return tuple(
        {
            i: axes[axis]
            for i, axis in enumerate(contract.symbolic_shape(t, dims, True))
            if axis in axes
        }
        for t in contract.step_inputs()
    )


def step_io_shapes(config: AttentionConfig) -> dict[str, list[str | int]]:
    """The contract's shapes of every step graph input and output, dynamic axes by name."""
    dims = contract_dims(config)
    tensors = (*contract.step_inputs(), *contract.step_outputs())
    return {t.name: contract.symbolic_shape(t, dims, True) for t in tensors}


def memory_example_inputs(
    tensors: tuple[contract.Tensor, ...], config: AttentionConfig, dtype: torch.dtype
) -> tuple[Tensor, ...]:
    """Trace-time inputs of a memory export's graph, of MEMORY_EXPORT_SHAPE."""
    dims = contract_dims(config)
    return trace_tensors(tensors, dims, False, MEMORY_EXPORT_SHAPE, dtype)


def memory_dynamic_shapes(
    tensors: tuple[contract.Tensor, ...], config: AttentionConfig
) -> tuple[dict[int, Any], ...]:
    """Per input of a memory export's graph, its named dynamic axes: B, T, S independent."""
    dims = contract_dims(config)
    axes = {name: torch.export.Dim(name) for name in ("B", "T", "S")}
    return tuple(
        {
            i: axes[axis]
            for i, axis in enumerate(contract.symbolic_shape(t, dims, False))
            if isinstance(axis, str)
        }
        for t in tensors
    )


def memory_io_shapes(
    tensors: tuple[contract.Tensor, ...], config: AttentionConfig
) -> dict[str, list[str | int]]:
    """The contract's shapes of the given memory-export tensors, dynamic axes by name."""
    dims = contract_dims(config)
    return {t.name: contract.symbolic_shape(t, dims, False) for t in tensors}
