"""The models a benchmark serves, exported with `mha export` when missing.

Exporting runs `mha export` in a subprocess, so the bench never imports torch. A pair is
two exports of the same embedded seeded weights that compute the same function in two
ways (a KV-cache step graph and a causal one; a held cross-attention memory and the
stateless cross model): their mha.json must agree on weights_sha256, and the scenarios
compare their answers too.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mha import contract
from mha.bench.framework.contenders import mha_command
from mha.errors import CliError
from mha.proto import grpc_predict_v2_pb2 as pb

DEFAULT_MODEL = "mha"  # what `mha export` writes without --name
VERSION = "1"  # of a pair's exports
EXPORT_EXTRA = ("torch", "onnx", "onnxscript")
Config = dict[str, Any]


def read_config(version_dir: Path) -> Config:
    path = version_dir / "mha.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError) as err:
        raise CliError(f"{path}: {err}") from None


def metadata_from_config(config: Config) -> pb.ModelMetadataResponse:
    """ModelMetadata as the server would report it, from a model's mha.json."""
    response = pb.ModelMetadataResponse(name=config["name"], versions=[str(config["version"])])
    for spec in config["inputs"]:
        response.inputs.add(name=spec["name"], datatype=spec["datatype"], shape=spec["shape"])
    for spec in config["outputs"]:
        response.outputs.add(name=spec["name"], datatype=spec["datatype"], shape=spec["shape"])
    return response


def version_dir(repository: Path, model: str, version: str = "") -> Path | None:
    """The model's version folder with a model.onnx (the latest unless `version`)."""
    if version:
        found = repository / model / version
        return found if (found / "model.onnx").is_file() else None
    numbers = sorted(
        (int(p.name) for p in (repository / model).glob("*") if p.name.isdigit()), reverse=True
    )
    folders = (repository / model / str(n) for n in numbers)
    return next((f for f in folders if (f / "model.onnx").is_file()), None)


def default_model(repository: Path, model: str = DEFAULT_MODEL, version: str = "") -> Path:
    """The version folder, exporting the embedded default model when it is missing."""
    found = version_dir(repository, model, version)
    if found is None and model == DEFAULT_MODEL and not version:
        print(f"exporting the default model to {repository} ...", file=sys.stderr, flush=True)
        command = [*mha_command(), "export", "--repository", str(repository), "--if-missing"]
        if subprocess.run(command, stdout=subprocess.DEVNULL).returncode != 0:
            raise CliError("`mha export` failed; see its output above")
        found = version_dir(repository, model)
    if found is None:
        raise CliError(f"no model {model!r} in {repository}; export it first")
    return found


def missing_extra() -> list[str]:
    return [m for m in EXPORT_EXTRA if importlib.util.find_spec(m) is None]


def export(
    repository: Path, name: str, flags: tuple[str, ...], d_model: int, num_heads: int
) -> None:
    """`mha export <flags>` of the embedded seeded weights as repository/name/1."""
    absent = ", ".join(missing_extra())
    if absent:
        why = f"exporting it needs the export extra ({absent} not installed)"
        raise CliError(f"{repository / name} is missing; {why}: pip install 'mha-serve[export]'")
    said = " ".join(flags)
    print(f"exporting {name} (mha export {said}) to {repository} ...", file=sys.stderr)
    options = {
        "--repository": repository,
        "--name": name,
        "--version": VERSION,
        "--d-model": d_model,
        "--num-heads": num_heads,
    }
    command = [*mha_command(), "export", *flags, *(str(p) for kv in options.items() for p in kv)]
    if subprocess.run(command, stdout=subprocess.DEVNULL).returncode != 0:
        raise CliError(f"`mha export {said} --name {name}` failed; see its output above")


@dataclass(frozen=True)
class PairKind:
    """How a pair is named, exported and told apart: (prefix, flags, is_it) per model."""

    models: tuple[tuple[str, tuple[str, ...], Callable[[Config], bool], str], ...]
    expected: Callable[[int, int], Config]  # what both mha.json say, given d_model and heads

    def names(self, d_model: int, num_heads: int) -> tuple[str, ...]:
        return tuple(f"{prefix}-d{d_model}-h{num_heads}" for prefix, *_ in self.models)


DECODE_PAIR = PairKind(
    (
        ("decode-kv", ("--kv-cache",), lambda c: "sequence" in c, "not a sequence model"),
        (
            "decode-full",
            ("--causal",),
            lambda c: "sequence" not in c and bool(c.get("causal")),
            "not a stateless causal model",
        ),
    ),
    lambda d, h: {"d_model": d, "num_heads": h, "dtype": "FP32"},
)
MEMORY_PAIR = PairKind(
    (
        (
            "cross-memory",
            ("--cross", "--kv-cache"),
            lambda c: c.get("sequence", {}).get("kind") == contract.MEMORY_KIND,
            "not a cross-attention memory model (--cross --kv-cache)",
        ),
        (
            "cross",
            ("--cross",),
            lambda c: "sequence" not in c,
            "not a stateless cross-attention model",
        ),
    ),
    lambda d, h: {
        "d_model": d,
        "num_heads": h,
        "kdim": d,
        "vdim": d,
        "dtype": "FP32",
        "self_attention": False,
    },
)


@dataclass(frozen=True)
class Pair:
    """Two exports of the same weights in one repository, and their mha.json."""

    repository: Path
    names: tuple[str, str]
    configs: tuple[Config, Config]

    def dir(self, index: int) -> Path:
        return self.repository / self.names[index] / VERSION


def ensure_pair(kind: PairKind, repository: Path, d_model: int, num_heads: int) -> Pair:
    """Both models of this size in `repository`, exported first when missing, and checked."""
    names = kind.names(d_model, num_heads)
    for name, (_, flags, _, _) in zip(names, kind.models, strict=True):
        if not (repository / name / VERSION / "model.onnx").is_file():
            export(repository, name, flags, d_model, num_heads)
    configs = tuple(read_config(repository / name / VERSION) for name in names)
    problems = [
        f"{name}: {key} is {config.get(key)!r}, expected {want!r}"
        for name, config in zip(names, configs, strict=True)
        for key, want in kind.expected(d_model, num_heads).items()
        if config.get(key) != want
    ]
    problems += [
        f"{name}: {why}"
        for name, config, (_, _, fits, why) in zip(names, configs, kind.models, strict=True)
        if not fits(config)
    ]
    if configs[0].get("weights_sha256") != configs[1].get("weights_sha256"):
        problems.append(f"{names[0]} and {names[1]} hold different weights (weights_sha256)")
    if problems:
        raise CliError(
            f"models in {repository} do not fit the benchmark: {'; '.join(problems)}; "
            f"delete them to export them again"
        )
    return Pair(repository, (names[0], names[1]), (configs[0], configs[1]))
