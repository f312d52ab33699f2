"""The model repository on disk: <repo>/<name>/<version>/{model.onnx, mha.json}.

Scanning reads only the small mha.json files, so the server knows every model name and
version (and can answer NOT_FOUND vs "not ready yet") before any session is loaded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mha import contract
from mha.service.core.errors import StartupError

log = logging.getLogger(__name__)

CONFIG_FILE = "mha.json"
MODEL_FILE = "model.onnx"
SUPPORTED_FORMAT = 1


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as mha.json declares it (-1 = dynamic dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    optional: bool = False


@dataclass(frozen=True)
class SequenceSpec:
    """A sequence (KV cache) model's step graph, from mha.json's "sequence" object."""

    kind: str  # contract.SEQUENCE_KIND or contract.MEMORY_KIND
    max_context: int  # tokens one sequence may hold (a memory: its length S)
    graph_inputs: tuple[TensorSpec, ...]  # the step graph's (contract.step_inputs ...)
    graph_outputs: tuple[TensorSpec, ...]  # (contract.step_outputs ...)
    memory_file: str | None = None  # a memory model's projection graph (memory.onnx)
    memory_inputs: tuple[TensorSpec, ...] = ()  # key, value
    memory_outputs: tuple[TensorSpec, ...] = ()  # memory_key, memory_value

    @property
    def is_memory(self) -> bool:
        """A cross-attention memory sequence (sent once), not a growing KV cache."""
        return self.kind == contract.MEMORY_KIND

    def contract_tensors(self) -> dict[str, contract.Tensor]:
        """The contract's tensors of this kind's graphs, by name."""
        if self.is_memory:
            graphs = (*contract.memory_step_inputs(), *contract.memory_step_outputs())
            graphs += (*contract.memory_projection_inputs(), *contract.memory_projection_outputs())
        else:
            graphs = (*contract.step_inputs(), *contract.step_outputs())
        tensors: dict[str, contract.Tensor] = {}
        for tensor in graphs:
            tensors.setdefault(tensor.name, tensor)  # a step's query before memory.onnx's
        return tensors


@dataclass(frozen=True)
class ModelSpec:
    """One model version: where it is and what its tensors look like."""

    name: str
    version: int
    path: Path  # the version folder
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    self_attention: bool
    dtype: str  # FP32 or FP16
    d_model: int
    num_heads: int
    max_batch_size: int
    max_sequence_length: int
    target: str
    config: dict[str, Any]
    sequence: SequenceSpec | None = None  # None: a stateless model

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def dims(self) -> contract.Dims:
        """E, kdim, vdim, h of this model (the contract's fixed axes)."""
        return contract.Dims(
            d_model=self.d_model,
            num_heads=self.num_heads,
            kdim=int(self.config.get("kdim", self.d_model)),
            vdim=int(self.config.get("vdim", self.d_model)),
        )

    @property
    def graph_inputs(self) -> tuple[TensorSpec, ...]:
        """What the session is fed: a request's inputs, or a sequence model's step inputs."""
        return self.sequence.graph_inputs if self.sequence else self.inputs

    @property
    def graph_output_names(self) -> tuple[str, ...]:
        outputs = self.sequence.graph_outputs if self.sequence else self.outputs
        return tuple(t.name for t in outputs)

    def shape_of(self, name: str, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """The concrete shape of one of this model's graph tensors for the dynamic sizes.

        sizes: B, L and S for a stateless model; B, T, P and C (= P + T) for a step graph.
        """
        return tuple(d if isinstance(d, int) else int(sizes[d]) for d in self.axes_of(name))

    def axes_of(self, name: str) -> tuple[str | int, ...]:
        """One of this model's graph tensors: its fixed sizes, and its dynamic axes by name."""
        if self.sequence is not None:
            tensor = self.sequence.contract_tensors()[name]
            return tuple(contract.symbolic_shape(tensor, self.dims, False))
        return tuple(contract.symbolic_shape(contract.tensor(name), self.dims, self.self_attention))

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


def _tensors(items: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(
            name=str(item["name"]),
            datatype=str(item["datatype"]),
            shape=tuple(int(d) for d in item["shape"]),
            optional=bool(item.get("optional", False)),
        )
        for item in items
    )


def _sequence(config: dict[str, Any]) -> SequenceSpec | None:
    section = config.get("sequence")
    if section is None:
        return None
    kinds = (contract.SEQUENCE_KIND, contract.MEMORY_KIND)
    if section.get("kind") not in kinds:
        raise ValueError(f"sequence kind {section.get('kind')!r}; this server runs {kinds}")
    memory = section.get("memory") or {}
    return SequenceSpec(
        kind=str(section["kind"]),
        max_context=int(section["max_context"]),
        graph_inputs=_tensors(section["graph_inputs"]),
        graph_outputs=_tensors(section["graph_outputs"]),
        memory_file=memory.get("file"),
        memory_inputs=_tensors(memory.get("graph_inputs", [])),
        memory_outputs=_tensors(memory.get("graph_outputs", [])),
    )


def read_spec(path: Path, name: str, version: int) -> ModelSpec:
    """Read one version folder's mha.json; StartupError saying what is wrong."""
    config_path = path / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
        if config.get("format") != SUPPORTED_FORMAT:
            raise StartupError(
                f"{config_path}: format {config.get('format')!r}, this server reads format "
                f"{SUPPORTED_FORMAT}"
            )
        return ModelSpec(
            name=name,
            version=version,
            path=path,
            inputs=_tensors(config["inputs"]),
            outputs=_tensors(config["outputs"]),
            self_attention=bool(config["self_attention"]),
            dtype=str(config["dtype"]),
            d_model=int(config["d_model"]),
            num_heads=int(config["num_heads"]),
            max_batch_size=int(config["max_batch_size"]),
            max_sequence_length=int(config["max_sequence_length"]),
            target=str(config.get("target", "")),
            config=config,
            sequence=_sequence(config),
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise StartupError(f"{config_path}: cannot read the model config: {err!r}") from err


def _versions(model_dir: Path) -> list[int]:
    versions = []
    for child in model_dir.iterdir():
        if not (child.is_dir() and child.name.isdigit() and int(child.name) > 0):
            continue
        if (child / MODEL_FILE).is_file() and (child / CONFIG_FILE).is_file():
            versions.append(int(child.name))
        else:
            log.warning("skipping %s: it lacks %s or %s", child, MODEL_FILE, CONFIG_FILE)
    return sorted(versions)


def scan(repository: Path) -> dict[str, dict[int, ModelSpec]]:
    """Every model -> {version: spec}; StartupError when there is nothing to serve."""
    if not repository.is_dir():
        raise StartupError(
            f"model repository {repository} is not a folder; export a model first "
            f"(mha export --repository {repository})"
        )
    models: dict[str, dict[int, ModelSpec]] = {}
    for model_dir in sorted(repository.iterdir()):
        if not model_dir.is_dir() or model_dir.name.startswith("."):
            continue
        versions = _versions(model_dir)
        if versions:
            specs = {v: read_spec(model_dir / str(v), model_dir.name, v) for v in versions}
            models[model_dir.name] = specs
    if not models:
        raise StartupError(
            f"model repository {repository} holds no model (<name>/<version>/{MODEL_FILE} "
            f"+ {CONFIG_FILE}); export one with: mha export --repository {repository}"
        )
    return models
