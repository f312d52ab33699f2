"""Shared fixtures: exported models, built once per test session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def export_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model repository shared by the whole session."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def exported(export_repo: Path) -> Callable[..., Path]:
    """Export (once per distinct set of options) and return the version folder.

    Keyword arguments are ExportOptions fields; d_model 64 and 4 heads by default so the
    suite stays fast; pass d_model=512, num_heads=8 for the embedded default's shape.
    """
    from mha.export import ExportOptions, export_model

    cache: dict[tuple, Path] = {}

    def get(**fields: object) -> Path:
        fields = {"d_model": 64, "num_heads": 4, **fields}
        key = tuple(sorted(fields.items()))
        if key not in cache:
            name = "m" + str(len(cache))
            options = ExportOptions(repository=export_repo, name=name, **fields)  # type: ignore[arg-type]
            cache[key] = export_model(options, progress=lambda _: None).model_dir
        return cache[key]

    return get
