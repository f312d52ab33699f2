"""Shared fixtures: exported models, built once per test session."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import pytest

# One OpenMP thread for torch in the test processes and the commands they start (inherited):
# every tensor here is tiny, so a second thread only spins, and under two xdist workers on two
# cores it spins against the other worker (a file of exports took 30% more CPU with it).
# Set before torch is first imported. Servers' ONNX Runtime threads come from their settings.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def export_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model repository shared by the whole session, and by its xdist workers."""
    base = tmp_path_factory.getbasetemp()
    # Under xdist each worker's basetemp is <run>/popen-gwN: the run's folder is shared.
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    repo = shared / "exports"
    repo.mkdir(exist_ok=True)
    return repo


# ExportOptions fields that say where an export goes, not what it is.
UNKEYED = ("repository", "name")


@pytest.fixture(scope="session")
def exported(export_repo: Path) -> Callable[..., Path]:
    """Export (once per distinct set of options, whichever worker asks first) and return
    the version folder.

    Keyword arguments are ExportOptions fields; d_model 64 and 4 heads by default so the
    suite stays fast; pass d_model=512, num_heads=8 for the embedded default's shape. The
    model's name is a digest of its options; a lock file per name makes a second worker
    wait for the first one's export instead of making its own.
    """
    from mha.export import ExportOptions, export_model

    cache: dict[str, Path] = {}

    def get(**fields: object) -> Path:
        fields = {"d_model": 64, "num_heads": 4, **fields}
        options = ExportOptions(repository=export_repo, **fields)  # type: ignore[arg-type]
        # The key is every option with its default filled in, so exported() and
        # exported(target="ort", dtype="fp32") are one export.
        chosen = {k: v for k, v in dataclasses.asdict(options).items() if k not in UNKEYED}
        key = json.dumps(sorted(chosen.items()), default=str)
        if key not in cache:
            name = "m" + hashlib.sha256(key.encode()).hexdigest()[:12]
            options = dataclasses.replace(options, name=name)
            with (export_repo / f"{name}.lock").open("w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                done = options.model_dir / "mha.json"
                if not done.is_file():
                    export_model(options, progress=lambda _: None)
            cache[key] = options.model_dir
        return cache[key]

    return get


@pytest.fixture
def bert_checkpoint() -> Callable[..., dict]:
    """write_bert_checkpoint(path, d_model=32, heads=4, layers=2, prefix="bert.")."""
    return write_bert_checkpoint


def write_bert_checkpoint(path, d_model=32, heads=4, layers=2, prefix="bert."):
    """A synthetic checkpoint with Hugging Face BERT's real tensor names."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(1)
    tensors = {f"{prefix}embeddings.word_embeddings.weight": torch.randn(10, d_model)}
    for n in range(layers):
        base = f"{prefix}encoder.layer.{n}.attention."
        for part in ("self.query", "self.key", "self.value", "output.dense"):
            tensors[f"{base}{part}.weight"] = torch.randn(d_model, d_model) / math.sqrt(d_model)
            tensors[f"{base}{part}.bias"] = torch.randn(d_model) * 0.1
        tensors[f"{base}output.LayerNorm.weight"] = torch.ones(d_model)
    save_file(tensors, str(path))
    (path.parent / "config.json").write_text(json.dumps({"num_attention_heads": heads}))
    return tensors


# Files whose tests share nothing costly but the session's exports: their tests spread over
# the xdist workers one by one. Every other file goes to one worker whole, so its
# module-scoped servers start once (pytest_xdist_make_scheduler below).
SPREAD_FILES = {
    "tests/export/test_parity.py",
    "tests/export/test_memory_export.py",
    "tests/export/test_kv_cache_export.py",
    "tests/export/test_cli.py",
}


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker more than the cores this process may use, at most 6. A worker
    waits on servers starting, subprocesses and another worker's export; the extra one
    fills those waits (on 2 cores: 309 s with 3 workers against 340 s with 2, one run each)."""
    return min(len(os.sched_getaffinity(0)) + 1, 6)


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """xdist's scope scheduling with a file as the scope, but a test in SPREAD_FILES.

    (xdist's own `--dist loadgroup` cannot do it here: under pytest 9 its groups never form.)
    """
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return nodeid if file in SPREAD_FILES else file

    return FileScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `cuda` tests without a CUDA-capable ONNX Runtime, `podman` tests without podman."""
    import shutil

    import onnxruntime as ort

    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    reasons = {
        "cuda": None if has_cuda else "needs onnxruntime-gpu with a CUDA GPU",
        "podman": None if shutil.which("podman") else "needs podman",
    }
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
