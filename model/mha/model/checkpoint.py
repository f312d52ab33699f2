"""A Hugging Face checkpoint folder as save_pretrained writes it, read without pickle or network.

`config.json` plus `model.safetensors`, or shards listed by `model.safetensors.index.json`
({"weight_map": {tensor name: shard file}}). Tensors are read one by one, on demand, so a
layer of a large checkpoint costs only that layer's bytes; every file read is hashed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

from mha.checkpoint_files import CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE, shard_files
from mha.checkpoint_files import read_json_object as read_file_object
from mha.model.weights import WeightsError, file_sha256


class Checkpoint:
    """One checkpoint folder: its config and the names and files of its tensors."""

    def __init__(self, folder: Path, weights_file: str | None = None) -> None:
        """weights_file: read that one safetensors file of the folder (a bare `--bert`
        file, whose config.json may be absent) instead of the folder's own layout."""
        if not folder.is_dir():
            raise WeightsError(f"{folder}: no such checkpoint folder")
        self.folder = folder
        self.read: set[str] = set()
        if weights_file is None:
            self.config = read_json_object(folder / CONFIG_FILE)
            self.files_of = tensor_files(folder)  # tensor name -> file name
            self.read.add(CONFIG_FILE)
        else:
            config_path = folder / CONFIG_FILE
            self.config = read_json_object(config_path) if config_path.is_file() else {}
            self.files_of = dict.fromkeys(file_keys(folder / weights_file), weights_file)
        if weights_file is None and (folder / INDEX_FILE).is_file():
            self.read.add(INDEX_FILE)

    @property
    def names(self) -> list[str]:
        """Every tensor name, sorted."""
        return sorted(self.files_of)

    @property
    def files(self) -> list[str]:
        """The safetensors files holding the tensors, sorted."""
        return sorted(set(self.files_of.values()))

    def has(self, name: str) -> bool:
        return name in self.files_of

    def tensor(self, name: str) -> Tensor:
        """One tensor as stored (any float dtype); WeightsError naming the file and the key."""
        file = self.files_of.get(name)
        if file is None:
            where = INDEX_FILE if INDEX_FILE in self.read else next(iter(self.files), WEIGHTS_FILE)
            raise WeightsError(f"{self.folder / where}: no tensor {name!r}")
        path = self.folder / file
        try:
            with safe_open(str(path), framework="pt") as f:
                tensor = f.get_tensor(name)
        except Exception as err:  # safetensors raises several types for a corrupt file
            raise WeightsError(f"{path}: cannot read tensor {name!r} ({err})") from err
        self.read.add(file)
        return tensor

    def setting(self, key: str, default: Any = None, required: bool = False) -> Any:
        """A config.json value; WeightsError naming the key when required and absent."""
        if key not in self.config:
            if required:
                raise WeightsError(f"{self.folder / CONFIG_FILE}: no {key!r}")
            return default
        return self.config[key]

    def integer(self, key: str) -> int:
        """A required positive integer of config.json."""
        value = self.setting(key, required=True)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise WeightsError(
                f"{self.folder / CONFIG_FILE}: {key!r} must be a positive integer, got {value!r}"
            )
        return value

    def sha256(self) -> dict[str, str]:
        """sha256 of every file read so far (config, index, the shards used)."""
        return {name: file_sha256(self.folder / name) for name in sorted(self.read)}


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object; WeightsError naming the file otherwise."""
    return read_file_object(path, WeightsError)


def tensor_files(folder: Path) -> dict[str, str]:
    """Tensor name -> file, from the shard index or the one model.safetensors."""
    if (folder / INDEX_FILE).is_file():
        return shard_files(folder, WeightsError)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise WeightsError(
            f"{folder}: no {WEIGHTS_FILE} nor {INDEX_FILE} (only safetensors are read, "
            "never pickled .bin files)"
        )
    return dict.fromkeys(file_keys(path), WEIGHTS_FILE)


def file_keys(path: Path) -> list[str]:
    """The tensor names of one safetensors file (its header only)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as err:  # safetensors raises several types for a corrupt header
        raise WeightsError(f"{path}: not a readable safetensors file ({err})") from err
