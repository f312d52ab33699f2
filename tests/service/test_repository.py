"""Scanning <repo>/<name>/<version>/{model.onnx, mha.json}."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mha.service.core.errors import NotFound, StartupError
from mha.service.core.models import ModelTable
from mha.service.core.repository import scan


def copy_model(source: Path, repo: Path, name: str, version: str) -> Path:
    target = repo / name / version
    shutil.copytree(source, target)
    return target


def test_scan_finds_models_and_versions(repository: Path, tmp_path: Path):
    for version in ("1", "2", "10"):
        copy_model(repository / "self" / "1", tmp_path, "a", version)
    copy_model(repository / "cross" / "1", tmp_path, "b", "1")
    (tmp_path / "a" / "notes").mkdir()  # not a version: ignored
    (tmp_path / "a" / "0").mkdir()  # versions are positive
    (tmp_path / "a" / "3").mkdir()  # no files: skipped with a warning
    models = scan(tmp_path)
    assert sorted(models) == ["a", "b"] and sorted(models["a"]) == [1, 2, 10]
    spec = models["b"][1]
    assert not spec.self_attention and spec.output_names == ("output", "attention_weights")
    assert spec.input("key_padding_mask").optional  # type: ignore[union-attr]
    table = ModelTable(models)
    assert table.resolve("a").version == 10  # latest by default
    with pytest.raises(NotFound, match="model 'a' has no version '3'; versions: 1, 2, 10"):
        table.resolve("a", "3")


def test_empty_or_missing_repository(tmp_path: Path):
    with pytest.raises(StartupError, match="is not a folder"):
        scan(tmp_path / "missing")
    with pytest.raises(StartupError, match="holds no model"):
        scan(tmp_path)


def test_unreadable_config_names_the_file(repository: Path, tmp_path: Path):
    folder = copy_model(repository / "self" / "1", tmp_path, "a", "1")
    (folder / "mha.json").write_text("{not json")
    with pytest.raises(StartupError, match=r"a/1/mha.json: cannot read the model config"):
        scan(tmp_path)
    (folder / "mha.json").write_text(json.dumps({"format": 2}))
    with pytest.raises(StartupError, match="format 2, this server reads format 1"):
        scan(tmp_path)
