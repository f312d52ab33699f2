"""Fixtures of the deploy tests."""

from __future__ import annotations

from typing import Any

import pytest
from deploy_helpers import K8S, OVERLAYS, render


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every overlay rendered once per session."""
    return {overlay: render(K8S / "overlays" / overlay) for overlay in OVERLAYS}
