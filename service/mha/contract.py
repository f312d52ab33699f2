"""The tensor contract of an exported model: names, roles, axes, datatypes, optionality.

docs/architecture.md ("Tensor contract") is the prose of this table. Export writes graphs
and mha.json from it; the server's validation, padding and data plane check requests
against it; the client shapes inputs by it. Torch-free on purpose (numpy only, for the
datatypes): every layer imports it.

Axes: B, L (query length) and S (key length) are dynamic and independent; E (d_model),
kdim, vdim and h (num_heads) are fixed by the model. In a self-attention export the key is
the query, so S is L and key/value are not graph inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

QUERY = "query"
KEY = "key"
VALUE = "value"
KEY_PADDING_MASK = "key_padding_mask"
OUTPUT = "output"
ATTENTION_WEIGHTS = "attention_weights"

DYNAMIC_AXES = ("B", "L", "S")
# fixed axis -> the model setting that sizes it (the name error messages use)
FIXED_AXES = {"E": "d_model", "kdim": "kdim", "vdim": "vdim", "h": "num_heads"}
FLOAT = "float"  # the model's datatype: FP32 or FP16
BOOL = "BOOL"
DEFAULT_OUTPUTS = (OUTPUT,)  # attention_weights only when a request asks for it

# Parity an export proves, per model datatype: (atol, rtol) against fp32 eager PyTorch. fp16:
# 1e-3 absolute plus one fp16 spacing (2**-10) relative, for the rounding of large values.
PARITY_TOLERANCE: dict[str, tuple[float, float]] = {"FP32": (1e-5, 0.0), "FP16": (1e-3, 2.0**-10)}

# The datatypes mha models use -> numpy dtype (little-endian, as the protocol's raw bytes are;
# BOOL is one byte per element).
DTYPES: dict[str, np.dtype] = {
    "FP32": np.dtype("<f4"),
    "FP16": np.dtype("<f2"),
    "BOOL": np.dtype("?"),
}
# Every datatype the Open Inference Protocol names, so "unknown" and "not this model's" read
# differently in errors.
PROTOCOL_DATATYPES = frozenset(
    ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
     "FP16", "FP32", "FP64", "BF16", "BYTES"]
)  # fmt: skip


def datatype_of(array: np.ndarray) -> str:
    """The protocol's datatype string of a numpy array's dtype (ValueError if mha has none)."""
    for name, dtype in DTYPES.items():
        if array.dtype == dtype or array.dtype == dtype.newbyteorder("="):
            return name
    raise ValueError(f"dtype {array.dtype} has no Open Inference Protocol datatype used by mha")


@dataclass(frozen=True)
class Tensor:
    """One tensor of the contract: its name, axes in order, datatype kind, optionality."""

    name: str
    axes: tuple[str, ...]
    datatype: str = FLOAT  # FLOAT = the model's datatype, else a fixed protocol datatype
    optional: bool = False  # inputs only: a request may omit it

    def sequence_axis(self, self_attention: bool) -> str | None:
        """ "L" or "S" for the axis that varies with a sequence (S is L in self-attention)."""
        axis = next((a for a in self.axes[1:] if a in ("L", "S")), None)
        return "L" if axis == "S" and self_attention else axis

    def padded_axes(self, self_attention: bool) -> tuple[str | None, ...]:
        """Per axis after the batch axis: "L", "S" or None (fixed)."""
        return tuple(
            ("L" if a == "S" and self_attention else a) if a in ("L", "S") else None
            for a in self.axes[1:]
        )


QUERY_TENSOR = Tensor(QUERY, ("B", "L", "E"))
KEY_TENSOR = Tensor(KEY, ("B", "S", "kdim"))
VALUE_TENSOR = Tensor(VALUE, ("B", "S", "vdim"))
# True = padding (ignored), torch.nn.MultiheadAttention's convention; omitted = none padded.
MASK_TENSOR = Tensor(KEY_PADDING_MASK, ("B", "S"), BOOL, optional=True)
OUTPUT_TENSOR = Tensor(OUTPUT, ("B", "L", "E"))
WEIGHTS_TENSOR = Tensor(ATTENTION_WEIGHTS, ("B", "h", "L", "S"))

TENSORS = {
    t.name: t
    for t in (QUERY_TENSOR, KEY_TENSOR, VALUE_TENSOR, MASK_TENSOR, OUTPUT_TENSOR, WEIGHTS_TENSOR)
}
KEY_SIDE = (KEY, VALUE, KEY_PADDING_MASK)  # inputs whose sequence axis is S


# A sequence (KV cache) model's step graph: causal self-attention over T new tokens of each
# of B sequences, given the projected keys and values of their P tokens so far. Sequences
# of different lengths share a step: past rows are right-padded to the longest P, new rows
# to the longest T, and key_padding_mask (over C = P + T: the past slots, then the new ones)
# is True on every padded slot. The caller keeps each sequence's cache and appends the
# new_key / new_value rows of its real new tokens to it.
PAST_KEY = "past_key"
PAST_VALUE = "past_value"
NEW_KEY = "new_key"
NEW_VALUE = "new_value"
STEP_QUERY_TENSOR = Tensor(QUERY, ("B", "T", "E"))
PAST_KEY_TENSOR = Tensor(PAST_KEY, ("B", "P", "E"))  # x W^K + b^K of each past token
PAST_VALUE_TENSOR = Tensor(PAST_VALUE, ("B", "P", "E"))  # x W^V + b^V
STEP_MASK_TENSOR = Tensor(KEY_PADDING_MASK, ("B", "C"), BOOL)  # C = P + T; always fed
STEP_OUTPUT_TENSOR = Tensor(OUTPUT, ("B", "T", "E"))
NEW_KEY_TENSOR = Tensor(NEW_KEY, ("B", "T", "E"))
NEW_VALUE_TENSOR = Tensor(NEW_VALUE, ("B", "T", "E"))
STEP_AXES = ("B", "T", "P", "C")  # the step graph's dynamic axes
SEQUENCE_KIND = "causal_self_attention"


def step_inputs() -> tuple[Tensor, ...]:
    """A step graph's inputs in order: query, past_key, past_value, key_padding_mask."""
    return (STEP_QUERY_TENSOR, PAST_KEY_TENSOR, PAST_VALUE_TENSOR, STEP_MASK_TENSOR)


def step_outputs() -> tuple[Tensor, ...]:
    """A step graph's outputs in order: output, new_key, new_value."""
    return (STEP_OUTPUT_TENSOR, NEW_KEY_TENSOR, NEW_VALUE_TENSOR)


def inputs(self_attention: bool) -> tuple[Tensor, ...]:
    """Graph inputs in order: query[, key, value], key_padding_mask."""
    if self_attention:
        return (QUERY_TENSOR, MASK_TENSOR)
    return (QUERY_TENSOR, KEY_TENSOR, VALUE_TENSOR, MASK_TENSOR)


def outputs(attention_weights: bool) -> tuple[Tensor, ...]:
    """Graph outputs in order: output[, attention_weights]."""
    return (OUTPUT_TENSOR, WEIGHTS_TENSOR) if attention_weights else (OUTPUT_TENSOR,)


def input_names(self_attention: bool) -> tuple[str, ...]:
    return tuple(t.name for t in inputs(self_attention))


def output_names(attention_weights: bool) -> tuple[str, ...]:
    return tuple(t.name for t in outputs(attention_weights))


def tensor(name: str) -> Tensor:
    """The contract's tensor of this name; ValueError naming the known ones."""
    try:
        return TENSORS[name]
    except KeyError:
        raise ValueError(
            f"{name!r} is not a tensor of the contract ({', '.join(TENSORS)})"
        ) from None


@dataclass(frozen=True)
class Dims:
    """The fixed sizes of one model: E = d_model, kdim, vdim, h = num_heads."""

    d_model: int
    num_heads: int
    kdim: int
    vdim: int

    def fixed(self, axis: str) -> int:
        return int(getattr(self, FIXED_AXES[axis]))


def symbolic_shape(t: Tensor, dims: Dims, self_attention: bool) -> list[str | int]:
    """Fixed axes as sizes, dynamic ones by name (S becomes L in self-attention)."""
    shape: list[str | int] = []
    for axis in t.axes:
        if axis in FIXED_AXES:
            shape.append(dims.fixed(axis))
        else:
            shape.append("L" if axis == "S" and self_attention else axis)
    return shape


def declared_shape(t: Tensor, dims: Dims, self_attention: bool) -> list[int]:
    """The shape mha.json and ModelMetadata declare: -1 for every dynamic axis."""
    return [d if isinstance(d, int) else -1 for d in symbolic_shape(t, dims, self_attention)]


def concrete_shape(
    t: Tensor, dims: Dims, self_attention: bool, sizes: Mapping[str, int]
) -> tuple[int, ...]:
    """The shape for given B, L and S (S ignored in self-attention)."""
    return tuple(
        d if isinstance(d, int) else int(sizes[d]) for d in symbolic_shape(t, dims, self_attention)
    )


def datatype(t: Tensor, model_datatype: str) -> str:
    """The protocol datatype of a tensor in a model of this datatype (FP32 or FP16)."""
    return model_datatype if t.datatype == FLOAT else t.datatype


def fixed_dim_name(name: str, axis: int) -> str:
    """What a fixed axis of an input is called in messages ("d_model", "kdim", ...)."""
    t = TENSORS.get(name)
    if t is None or axis >= len(t.axes) or t.axes[axis] not in FIXED_AXES:
        return f"dimension {axis}"
    return FIXED_AXES[t.axes[axis]]


def json_specs(
    dims: Dims, self_attention: bool, attention_weights: bool, model_datatype: str
) -> tuple[list[dict], list[dict]]:
    """mha.json's "inputs" and "outputs": name, datatype, shape (-1 = dynamic), optional."""

    def spec(t: Tensor) -> dict:
        entry: dict[str, object] = {
            "name": t.name,
            "datatype": datatype(t, model_datatype),
            "shape": declared_shape(t, dims, self_attention),
        }
        if t.optional:
            entry["optional"] = True
        return entry

    ins = [spec(t) for t in inputs(self_attention)]
    return ins, [spec(t) for t in outputs(attention_weights)]


# mha.json's "sequence" object of a KV-cache export: the step graph's tensors, and how the
# server keeps each sequence's cache (the step outputs appended to the cache tensors, in order).
CACHE_TENSORS = (PAST_KEY, PAST_VALUE)
CACHE_APPENDED_FROM = (NEW_KEY, NEW_VALUE)
CACHE_LAYOUT = "[B, P, E]"


def step_json_spec(t: Tensor, dims: Dims, model_datatype: str) -> dict:
    """One step graph tensor as mha.json declares it: name, datatype, shape (-1 = dynamic)."""
    return {
        "name": t.name,
        "datatype": datatype(t, model_datatype),
        "shape": declared_shape(t, dims, True),
    }


def step_json_specs(dims: Dims, model_datatype: str) -> tuple[list[dict], list[dict]]:
    """mha.json's sequence "graph_inputs" and "graph_outputs": the step graph's tensors."""
    return (
        [step_json_spec(t, dims, model_datatype) for t in step_inputs()],
        [step_json_spec(t, dims, model_datatype) for t in step_outputs()],
    )


def sequence_request_specs(dims: Dims, model_datatype: str) -> tuple[list[dict], list[dict]]:
    """mha.json's "inputs" and "outputs" of a KV-cache export: what a request of one sequence
    carries (B = 1): query [1, -1, E] in, output [1, -1, E] back."""

    def spec(t: Tensor) -> dict:
        entry = step_json_spec(t, dims, model_datatype)
        return {**entry, "shape": [1, *entry["shape"][1:]]}

    return [spec(STEP_QUERY_TENSOR)], [spec(STEP_OUTPUT_TENSOR)]


def sequence_json(dims: Dims, model_datatype: str, max_context: int) -> dict:
    """mha.json's "sequence" object of a KV-cache export (max_context: tokens per sequence)."""
    graph_inputs, graph_outputs = step_json_specs(dims, model_datatype)
    return {
        "kind": SEQUENCE_KIND,
        "max_context": max_context,
        "graph_inputs": graph_inputs,
        "graph_outputs": graph_outputs,
        "cache": {
            "tensors": list(CACHE_TENSORS),
            "appended_from": list(CACHE_APPENDED_FROM),
            "layout": CACHE_LAYOUT,
            "bytes_per_token": len(CACHE_TENSORS) * dims.d_model * DTYPES[model_datatype].itemsize,
        },
    }


# A cross-attention memory model (an encoder-decoder's cross-attention, decoding): two
# graphs in one version folder. memory.onnx projects a memory once: key [B, S, kdim] and
# value [B, S, vdim] -> memory_key / memory_value [B, S, E] (x W^K + b, x W^V + b; no
# attention node). model.onnx is the step: query [B, T, E] attends the projected memory
# under key_padding_mask [B, S] (True = padding: the sequence's own mask, and the slots
# past its S when sequences of different S share a step) -> output [B, T, E]; one fused
# attention node, no causal mask. The caller keeps each sequence's projected memory.
MEMORY_KEY = "memory_key"
MEMORY_VALUE = "memory_value"
MEMORY_KIND = "cross_attention_memory"
MEMORY_FILE = "memory.onnx"
MEMORY_STEP_QUERY_TENSOR = Tensor(QUERY, ("B", "T", "E"))
MEMORY_KEY_TENSOR = Tensor(MEMORY_KEY, ("B", "S", "E"))
MEMORY_VALUE_TENSOR = Tensor(MEMORY_VALUE, ("B", "S", "E"))
MEMORY_MASK_TENSOR = Tensor(KEY_PADDING_MASK, ("B", "S"), BOOL)  # always fed by the server
MEMORY_STEP_OUTPUT_TENSOR = Tensor(OUTPUT, ("B", "T", "E"))


def memory_step_inputs() -> tuple[Tensor, ...]:
    """The cross step graph's inputs: query, memory_key, memory_value, key_padding_mask."""
    return (MEMORY_STEP_QUERY_TENSOR, MEMORY_KEY_TENSOR, MEMORY_VALUE_TENSOR, MEMORY_MASK_TENSOR)


def memory_step_outputs() -> tuple[Tensor, ...]:
    return (MEMORY_STEP_OUTPUT_TENSOR,)


def memory_projection_inputs() -> tuple[Tensor, ...]:
    """memory.onnx's inputs: key [B, S, kdim], value [B, S, vdim]."""
    return (KEY_TENSOR, VALUE_TENSOR)


def memory_projection_outputs() -> tuple[Tensor, ...]:
    """memory.onnx's outputs: memory_key, memory_value [B, S, E]."""
    return (MEMORY_KEY_TENSOR, MEMORY_VALUE_TENSOR)


# mha.json of a cross-attention memory export. "inputs" are what a request may carry: query
# with every request; key and value with sequence_start only (the server projects them once
# through memory.onnx and keeps the result); key_padding_mask optional (omitted: nothing
# padded). The step graph's own tensors, and memory.onnx's, are in "sequence".
MEMORY_CACHE_TENSORS = (MEMORY_KEY, MEMORY_VALUE)
MEMORY_CACHE_LAYOUT = "[B, S, E]"


def memory_request_specs(dims: Dims, model_datatype: str) -> tuple[list[dict], list[dict]]:
    """mha.json's "inputs" and "outputs" of a memory export, for one sequence (B = 1): query
    [1, -1, E], key [1, -1, kdim], value [1, -1, vdim], key_padding_mask [1, -1] optional in;
    output [1, -1, E] back."""

    def spec(t: Tensor) -> dict:
        entry: dict[str, object] = {
            "name": t.name,
            "datatype": datatype(t, model_datatype),
            "shape": [1, *declared_shape(t, dims, False)[1:]],
        }
        if t.optional:
            entry["optional"] = True
        return entry

    requested = (QUERY_TENSOR, KEY_TENSOR, VALUE_TENSOR, MASK_TENSOR)
    return [spec(t) for t in requested], [spec(OUTPUT_TENSOR)]


def memory_json_specs(tensors: tuple[Tensor, ...], dims: Dims, model_datatype: str) -> list[dict]:
    """Graph tensors of a memory export as mha.json declares them (-1 = dynamic)."""
    return [
        {
            "name": t.name,
            "datatype": datatype(t, model_datatype),
            "shape": declared_shape(t, dims, False),
        }
        for t in tensors
    ]


def memory_sequence_json(dims: Dims, model_datatype: str, max_context: int) -> dict:
    """mha.json's "sequence" object of a memory export (max_context: the longest memory S)."""
    return {
        "kind": MEMORY_KIND,
        "max_context": max_context,
        "graph_inputs": memory_json_specs(memory_step_inputs(), dims, model_datatype),
        "graph_outputs": memory_json_specs(memory_step_outputs(), dims, model_datatype),
        "memory": {
            "file": MEMORY_FILE,
            "graph_inputs": memory_json_specs(memory_projection_inputs(), dims, model_datatype),
            "graph_outputs": memory_json_specs(memory_projection_outputs(), dims, model_datatype),
        },
        "cache": {
            "tensors": list(MEMORY_CACHE_TENSORS),
            "layout": MEMORY_CACHE_LAYOUT,
            "bytes_per_token": len(MEMORY_CACHE_TENSORS)
            * dims.d_model
            * DTYPES[model_datatype].itemsize,
        },
    }
