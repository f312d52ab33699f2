"""Request inputs for `mha infer`: seeded random arrays shaped from ModelMetadata, or .npy files.

Shapes follow the tensor contract (mha.contract, docs/architecture.md): query [B, L, E],
key [B, S, kdim], value [B, S, vdim], key_padding_mask [B, S] (True = padding). Fixed dims
come from the server's metadata, so the same flags work for any d_model and for self or
cross attention.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mha import contract
from mha.proto import grpc_predict_v2_pb2 as pb

MASK = contract.KEY_PADDING_MASK


class InputError(ValueError):
    """Inputs that cannot be built as asked (message for a person)."""


@dataclass(frozen=True)
class Sizes:
    batch: int
    length: int
    source_length: int | None = None  # S; None = same as L (self-attention)

    @property
    def source(self) -> int:
        return self.length if self.source_length is None else self.source_length


def load_arrays(paths: Mapping[str, Path | None]) -> dict[str, np.ndarray]:
    """Load the .npy files that were given, by input name."""
    arrays = {}
    for name, path in paths.items():
        if path is None:
            continue
        try:
            arrays[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read the {name} file {path}: {err}") from None
    return arrays


def resolve_sizes(given: Mapping[str, np.ndarray], defaults: Sizes) -> Sizes:
    """B, L, S from the given arrays where present, else the defaults."""
    batch, length = defaults.batch, defaults.length
    query = given.get(contract.QUERY)
    if query is not None and query.ndim >= 2:
        batch, length = query.shape[:2]
    source = length if defaults.source_length is None else defaults.source_length
    for name in contract.KEY_SIDE:
        if name in given and given[name].ndim >= 2:
            batch, source = given[name].shape[:2]
    return Sizes(int(batch), int(length), int(source))


def shape_for(tensor: pb.ModelMetadataResponse.TensorMetadata, sizes: Sizes) -> tuple[int, ...]:
    """The concrete shape of an input: dynamic dims filled with B, L or S by role."""
    sequence = sizes.source if tensor.name in contract.KEY_SIDE else sizes.length
    shape = []
    for axis, dim in enumerate(tensor.shape):
        if dim >= 0:
            shape.append(int(dim))
        else:
            shape.append(sizes.batch if axis == 0 else sequence)
    return tuple(shape)


def random_inputs(
    metadata: pb.ModelMetadataResponse, sizes: Sizes, seed: int
) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs (no mask) in the model's datatypes."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for tensor in metadata.inputs:
        if tensor.name == MASK or tensor.datatype == "BOOL":
            continue  # optional: omitted means nothing is padded
        dtype = _dtype(tensor)
        arrays[tensor.name] = rng.standard_normal(shape_for(tensor, sizes)).astype(dtype)
    return arrays


def padding_mask(batch: int, source_length: int, padded: int) -> np.ndarray:
    """key_padding_mask [B, S] with the last `padded` keys of every sample masked."""
    if not 0 <= padded <= source_length:
        raise InputError(f"--padded {padded} must be between 0 and S={source_length}")
    mask = np.zeros((batch, source_length), dtype=bool)
    if padded:
        mask[:, source_length - padded :] = True
    return mask


def build_inputs(
    metadata: pb.ModelMetadataResponse,
    given: Mapping[str, np.ndarray],
    defaults: Sizes,
    *,
    seed: int = 0,
    padded: int = 0,
) -> dict[str, np.ndarray]:
    """Inputs in the metadata's order: the given arrays, random ones for the rest."""
    known = {t.name: t for t in metadata.inputs}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise InputError(
            f"model {metadata.name!r} has no input {', '.join(unknown)}; "
            f"its inputs: {', '.join(known)}"
        )
    sizes = resolve_sizes(given, defaults)
    arrays = random_inputs(metadata, sizes, seed)
    for name, array in given.items():
        arrays[name] = array.astype(_dtype(known[name]), copy=False)
    if padded and MASK not in given:
        if MASK not in known:
            raise InputError(f"model {metadata.name!r} has no {MASK} input; --padded needs one")
        arrays[MASK] = padding_mask(sizes.batch, sizes.source, padded)
    order = [t.name for t in metadata.inputs]
    return {name: arrays[name] for name in order if name in arrays}


def _dtype(tensor: pb.ModelMetadataResponse.TensorMetadata) -> np.dtype:
    try:
        return contract.DTYPES[tensor.datatype]
    except KeyError:
        raise InputError(
            f"input {tensor.name!r} has datatype {tensor.datatype}; mha infer sends "
            f"{', '.join(contract.DTYPES)}"
        ) from None


def output_names(metadata: pb.ModelMetadataResponse) -> Sequence[str]:
    return [t.name for t in metadata.outputs]
