"""Fixtures of the snapshot tests: a tree with every kind of entry, and a store that extracts
with the host's confined tar or in a container."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.checkpoints.store import SnapshotStore
from tests.helpers import make_tree


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    root.mkdir()
    make_tree(root)
    return root


@pytest.fixture(params=["host-tar", "container-tar"])
def store(tmp_path: Path, request: pytest.FixtureRequest) -> SnapshotStore:
    return SnapshotStore(tmp_path / "snapshots", isolate=request.param == "container-tar")
