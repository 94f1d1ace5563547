"""A snapshot store entry that is a symlink to a directory elsewhere (a snapshot moved to
another disk, or planted): pruning it removes the link, never what it leads to, and no
traceback."""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.checkpoints.store import SnapshotStore
from orchestrator.workspace import Workspace
from tests.helpers import run_cli


def test_prune_removes_a_symlinked_entry_without_following_it(
    workspace: Workspace, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_bytes(b"content\n")
    store = SnapshotStore(workspace.snapshots_dir)
    old, new = "a" * 64, "b" * 64
    for key in (old, new):
        store.create(tree, key, stage="s", parent=None, metadata={})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.rename(workspace.snapshots_dir / old, elsewhere / old)
    os.symlink(elsewhere / old, workspace.snapshots_dir / old)
    before = sorted(os.listdir(elsewhere / old))

    result = run_cli("snapshots", "prune", "--keep", "1")

    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith(f"removed {old}\n1 snapshot(s) removed, ")
    assert not os.path.lexists(workspace.snapshots_dir / old)
    assert sorted(os.listdir(elsewhere / old)) == before
    assert store.has(new)
