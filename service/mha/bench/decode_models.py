"""The two models `mha bench decode` compares, exported with the same weights when missing.

decode-kv-d<E>-h<h> is the KV-cache step graph (`mha export --kv-cache`), decode-full-d<E>-h<h>
stateless causal self-attention (`mha export --causal`). Both take the embedded seeded
weights of that size, so they compute the same function: their mha.json must agree on
weights_sha256, and the benchmark compares their answers too. Exporting runs `mha export`
in a subprocess, so this process never imports torch.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mha.bench.servers import mha_command
from mha.errors import CliError

VERSION = "1"
EXPORT_EXTRA = ("torch", "onnx", "onnxscript")


@dataclass(frozen=True)
class DecodeModels:
    """The repository, the step model's and the causal model's names, and their mha.json."""

    repository: Path
    kv: str
    full: str
    kv_config: dict[str, Any]
    full_config: dict[str, Any]

    @property
    def kv_dir(self) -> Path:
        return self.repository / self.kv / VERSION


def model_names(d_model: int, num_heads: int) -> tuple[str, str]:
    """(step model, causal model) names for this size."""
    size = f"d{d_model}-h{num_heads}"
    return f"decode-kv-{size}", f"decode-full-{size}"


def ensure_models(repository: Path, d_model: int, num_heads: int) -> DecodeModels:
    """Both models of this size in `repository`, exported first when missing."""
    kv, full = model_names(d_model, num_heads)
    for name, flags in ((kv, ("--kv-cache",)), (full, ("--causal",))):
        if not (repository / name / VERSION / "model.onnx").is_file():
            export(repository, name, flags, d_model, num_heads)
    models = DecodeModels(
        repository, kv, full, read_config(repository, kv), read_config(repository, full)
    )
    check_pair(models, d_model, num_heads)
    return models


def export(
    repository: Path, name: str, flags: tuple[str, ...], d_model: int, num_heads: int
) -> None:
    """`mha export <flags>` of the embedded seeded weights as repository/name/1."""
    absent = ", ".join(m for m in EXPORT_EXTRA if importlib.util.find_spec(m) is None)
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
    command = [*mha_command(), "export", *flags]
    command += [str(part) for pair in options.items() for part in pair]
    if subprocess.run(command, stdout=subprocess.DEVNULL).returncode != 0:
        raise CliError(f"`mha export {said} --name {name}` failed; see its output above")


def read_config(repository: Path, name: str) -> dict[str, Any]:
    path = repository / name / VERSION / "mha.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError) as err:
        raise CliError(f"{path}: {err}") from None


def check_pair(models: DecodeModels, d_model: int, num_heads: int) -> None:
    """The step model holds a sequence, the other is causal, and both are these weights."""
    kv, full = models.kv_config, models.full_config
    problems = [
        f"{name}: {key} is {config.get(key)!r}, expected {want!r}"
        for name, config in ((models.kv, kv), (models.full, full))
        for key, want in (("d_model", d_model), ("num_heads", num_heads), ("dtype", "FP32"))
        if config.get(key) != want
    ]
    if "sequence" not in kv:
        problems.append(f"{models.kv}: not a sequence model (no 'sequence' in mha.json)")
    if "sequence" in full or not full.get("causal"):
        problems.append(f"{models.full}: not a stateless causal model")
    if kv.get("weights_sha256") != full.get("weights_sha256"):
        problems.append(f"{models.kv} and {models.full} hold different weights (weights_sha256)")
    if problems:
        raise CliError(
            f"models in {models.repository} do not fit the benchmark: {'; '.join(problems)}; "
            f"delete them to export them again"
        )
