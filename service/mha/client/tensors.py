"""Tensors of a Hugging Face checkpoint folder, read with numpy alone.

The client installs without torch or the safetensors package, so this reads the format
itself: 8 bytes little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then the raw bytes (https://github.com/huggingface/safetensors, "Format").
Files are memory-mapped, so taking an embedding row reads only that row. Sharded
checkpoints list their files in model.safetensors.index.json ("weight_map").
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from mha.checkpoint_files import INDEX_FILE, WEIGHTS_FILE, shard_files
from mha.checkpoint_files import CheckpointFileError as CheckpointError
from mha.checkpoint_files import read_json_object as read_json

__all__ = ["CheckpointError", "Tensors", "read_header", "read_json", "weight_files"]

DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}
MAX_HEADER_BYTES = 100 << 20


class Tensors:
    """Name -> array (fp32) over the folder's safetensors files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.headers: dict[str, tuple[Path, int, dict[str, Any]]] = {}  # name -> file, base, entry
        for file in weight_files(folder):
            self.add_file(folder / file)

    def add_file(self, path: Path) -> None:
        base, header = read_header(path)
        for name, entry in header.items():
            if name != "__metadata__":
                self.headers[name] = (path, base, entry)

    def names(self) -> list[str]:
        return sorted(self.headers)

    def get(self, name: str) -> np.ndarray:
        """One tensor as float32; CheckpointError naming the key when absent or malformed."""
        if name not in self.headers:
            raise CheckpointError(f"{self.folder}: no tensor {name!r}")
        path, base, entry = self.headers[name]
        try:
            dtype = DTYPES[entry["dtype"]]
            start, end = (int(x) for x in entry["data_offsets"])
            shape = tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: bad header entry for {name!r} ({err})") from err
        count = (end - start) // np.dtype(dtype).itemsize
        raw = np.memmap(path, dtype=dtype, mode="r", offset=base + start, shape=(count,))
        if count != int(np.prod(shape)):
            raise CheckpointError(f"{path}: {name!r} holds {count} values, shape says {shape}")
        if entry["dtype"] == "BF16":  # bfloat16 is the top half of a float32
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        return np.asarray(raw, dtype=np.float32).reshape(shape)


def weight_files(folder: Path) -> list[str]:
    """The safetensors files of a folder: the shard index's, or model.safetensors."""
    if (folder / INDEX_FILE).is_file():
        return sorted(set(shard_files(folder).values()))
    if not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} nor {INDEX_FILE}")
    return [WEIGHTS_FILE]


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data, the JSON header) of one safetensors file."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(length, MAX_HEADER_BYTES)))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (OSError, struct.error, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file (header not an object)")
    return 8 + length, header
