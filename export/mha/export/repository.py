"""Write an export into the model repository: model.onnx (+ data) and mha.json."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import onnx

from mha.export.onnx_graph import set_metadata
from mha.export.options import EXTERNAL_DATA_BYTES

CONFIG_FILE = "mha.json"
MODEL_FILE = "model.onnx"
METADATA_KEY = "mha.config"


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Total size of the initializers' raw data."""
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save_model(
    model: onnx.ModelProto, folder: Path, external: bool | None, file: str = MODEL_FILE
) -> list[Path]:
    """Save model.onnx or another file (external data when large or asked); return the
    files written."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file
    if external is None:
        external = initializer_bytes(model) > EXTERNAL_DATA_BYTES
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=file + ".data",
            size_threshold=1024,
        )
        return [path, folder / (file + ".data")]
    onnx.save_model(model, str(path))
    return [path]


def staging_dir(final: Path) -> Path:
    """A fresh folder beside the final one, so the move into place is a rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))


def write_version(
    model: onnx.ModelProto,
    config: dict,
    staging: Path,
    external: bool | None,
    extra: Mapping[str, onnx.ModelProto] | None = None,
) -> list[Path]:
    """Write model.onnx, the extra graphs (file name -> graph: a memory export's
    memory.onnx) and mha.json into the staging folder; every graph carries mha.json."""
    metadata = {METADATA_KEY: json.dumps(config, sort_keys=True)}
    files = []
    for file, graph in {MODEL_FILE: model, **(extra or {})}.items():
        set_metadata(graph, metadata)
        files += save_model(graph, staging, external, file)
    (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return [*files, staging / CONFIG_FILE]


def install(staging: Path, final: Path) -> None:
    """Move a validated staging folder into place, replacing an older export of that version."""
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)


def has_model(folder: Path) -> bool:
    """True when the folder holds a complete export."""
    return (folder / MODEL_FILE).is_file() and (folder / CONFIG_FILE).is_file()
