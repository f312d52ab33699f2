"""The wheel holds every package of the source tree (the image installs the wheel, not the tree)."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def source_packages() -> set[str]:
    """Every folder holding Python modules under the code folders, as its module name."""
    found = set()
    for top in ("service", "model", "export"):
        for module in (ROOT / top / "mha").rglob("*.py"):
            found.add(".".join(module.parent.relative_to(ROOT / top).parts))
    return found


def test_every_source_package_is_in_the_wheel() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    assert source_packages() - listed == set()
    assert listed - source_packages() == set()
