"""The two models `mha bench memory` compares, exported with the same weights when missing.

cross-memory-d<E>-h<h> is the cross-attention memory model (`mha export --cross --kv-cache`:
memory.onnx projects a memory once, model.onnx is the step over it); cross-d<E>-h<h> the
stateless cross-attention model (`mha export --cross`). Both take the embedded seeded
weights of that size (kdim = vdim = d_model), so they compute the same function: their
mha.json must agree on weights_sha256. Exporting runs `mha export` in a subprocess, so this
process never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mha import contract
from mha.bench.decode_models import VERSION, export, read_config
from mha.errors import CliError

MEMORY_FLAGS, CROSS_FLAGS = ("--cross", "--kv-cache"), ("--cross",)


@dataclass(frozen=True)
class MemoryModels:
    """The repository, the memory model's and the stateless cross model's names and mha.json."""

    repository: Path
    memory: str
    cross: str
    memory_config: dict[str, Any]
    cross_config: dict[str, Any]


def model_names(d_model: int, num_heads: int) -> tuple[str, str]:
    """(memory model, stateless cross model) names for this size."""
    size = f"d{d_model}-h{num_heads}"
    return f"cross-memory-{size}", f"cross-{size}"


def ensure_models(repository: Path, d_model: int, num_heads: int) -> MemoryModels:
    """Both models of this size in `repository`, exported first when missing."""
    memory, cross = model_names(d_model, num_heads)
    for name, flags in ((memory, MEMORY_FLAGS), (cross, CROSS_FLAGS)):
        if not (repository / name / VERSION / "model.onnx").is_file():
            export(repository, name, flags, d_model, num_heads)
    models = MemoryModels(
        repository, memory, cross, read_config(repository, memory), read_config(repository, cross)
    )
    check_pair(models, d_model, num_heads)
    return models


def check_pair(models: MemoryModels, d_model: int, num_heads: int) -> None:
    """One holds a cross-attention memory, the other is stateless cross, both these weights."""
    memory, cross = models.memory_config, models.cross_config
    wanted = {"d_model": d_model, "num_heads": num_heads, "kdim": d_model, "vdim": d_model,
              "dtype": "FP32", "self_attention": False}  # fmt: skip
    problems = [
        f"{name}: {key} is {config.get(key)!r}, expected {want!r}"
        for name, config in ((models.memory, memory), (models.cross, cross))
        for key, want in wanted.items()
        if config.get(key) != want
    ]
    if memory.get("sequence", {}).get("kind") != contract.MEMORY_KIND:
        problems.append(f"{models.memory}: not a cross-attention memory model (--cross --kv-cache)")
    if "sequence" in cross:
        problems.append(f"{models.cross}: not a stateless cross-attention model")
    if memory.get("weights_sha256") != cross.get("weights_sha256"):
        problems.append(
            f"{models.memory} and {models.cross} hold different weights (weights_sha256)"
        )
    if problems:
        raise CliError(
            f"models in {models.repository} do not fit the benchmark: {'; '.join(problems)}; "
            f"delete them to export them again"
        )
