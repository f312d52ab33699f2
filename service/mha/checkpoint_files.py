"""The files of a Hugging Face checkpoint folder, as save_pretrained writes them.

`config.json`, then `model.safetensors` or shards listed by `model.safetensors.index.json`
({"weight_map": {tensor name: shard file}}). Read here once for both readers of a folder:
mha.model (tensors through safetensors and torch, for export) and mha.client (tensors with
numpy alone, for `mha infer --text`). This module imports nothing of the project. Each
function raises `error` (the caller's own ValueError type) with a message naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointFileError(ValueError):
    """A checkpoint file that is missing or malformed (the message names file and key)."""


def read_json_object(path: Path, error: type[ValueError] = CheckpointFileError) -> dict[str, Any]:
    """A JSON file holding an object; `error` naming the file otherwise."""
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise error(f"{path}: not valid JSON ({err})") from err
    if not isinstance(document, dict):
        raise error(f"{path}: expected a JSON object, got {type(document).__name__}")
    return document


def shard_files(folder: Path, error: type[ValueError] = CheckpointFileError) -> dict[str, str]:
    """The shard index's weight_map, checked: string names to shard files that exist."""
    index_path = folder / INDEX_FILE
    weight_map = read_json_object(index_path, error).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise error(f"{index_path}: no 'weight_map' object of tensor name -> file")
    for name, file in weight_map.items():
        if not isinstance(file, str) or "/" in file or file.startswith("."):
            raise error(f"{index_path}: weight_map[{name!r}] = {file!r} is not a file name")
        if not (folder / file).is_file():
            raise error(f"{index_path}: weight_map[{name!r}] names {file}, which is missing")
    return dict(weight_map)
