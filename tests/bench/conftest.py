"""Repositories of the bench tests, linked from the session's exports (each exported once)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from harness import link_repository

from mha.bench.framework import models

KV, CAUSAL = {"kv_cache": True}, {"causal": True}
CROSS_MEMORY, CROSS = {"self_attention": False, "kv_cache": True}, {"self_attention": False}


def pair_repository(
    kind: models.PairKind, fields: tuple[dict, dict], exported: Callable[..., Path], root: Path
) -> Path:
    """A repository holding a pair of d_model 64, 4 heads, named as the scenario names it."""
    names = kind.names(64, 4)
    return link_repository(root, exported, dict(zip(names, fields, strict=True)))


@pytest.fixture(scope="session")
def decode_repo(exported: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`mha bench decode --quick`'s two models: the KV-cache step model and the causal one."""
    root = tmp_path_factory.mktemp("decode-repo")
    return pair_repository(models.DECODE_PAIR, (KV, CAUSAL), exported, root)


@pytest.fixture(scope="session")
def memory_repo(exported: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`mha bench memory --quick`'s two models: the held memory's and the stateless cross."""
    root = tmp_path_factory.mktemp("memory-repo")
    return pair_repository(models.MEMORY_PAIR, (CROSS_MEMORY, CROSS), exported, root)


def no_bench_folders(tmp: Path) -> list[str]:
    """What a benchmark left in its TMPDIR (nothing, when it cleans up)."""
    return sorted(p.name for p in tmp.glob("mha-bench-*"))
