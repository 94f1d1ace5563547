"""Two snapshots compared entry by entry, on real trees in two real stores: every kind of
difference is named, mtimes never count, and a file's bytes are read back from its layer."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from orchestrator.build.reproducible import (
    ReproducibilityReport,
    StageComparison,
    compare_builds,
    report_lines,
)
from orchestrator.build.state import RunState
from orchestrator.checkpoints import compare
from orchestrator.checkpoints.manifest import SnapshotError
from orchestrator.checkpoints.store import SnapshotStore
from orchestrator.errors import LfsorchError
from tests.helpers import make_tree

KEY = "k" * 64


def _snapshot(tmp_path: Path, name: str, tree: Path, key: str = KEY) -> SnapshotStore:
    store = SnapshotStore(tmp_path / f"store-{name}")
    store.create(tree, key, stage="s1")
    return store


@pytest.fixture
def twins(tmp_path: Path) -> tuple[Path, Path]:
    """The same tree twice, written a moment apart: every mtime differs."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    make_tree(a)
    time.sleep(0.01)
    b.mkdir()
    make_tree(b)
    return a, b


def test_equal_trees_written_at_different_times_are_identical(
    tmp_path: Path, twins: tuple[Path, Path]
) -> None:
    a, b = twins
    assert os.lstat(a / "usr/bin/bash").st_mtime_ns != os.lstat(b / "usr/bin/bash").st_mtime_ns
    left, right = _snapshot(tmp_path, "a", a), _snapshot(tmp_path, "b", b)

    identical, differences = compare.compare_manifests(left.manifest(KEY), right.manifest(KEY))

    assert differences == []
    assert identical == len(left.manifest(KEY).entries)


def test_each_kind_of_difference_is_named(tmp_path: Path, twins: tuple[Path, Path]) -> None:
    a, b = twins
    (b / "usr/bin/bash").write_bytes(b"\x7fELF bash " * 499 + b"\x7fELF BASH ")
    os.chmod(b / "usr/bin/su", 0o755)
    os.chown(b / "home/tester/notes", 1000, 1000)
    os.unlink(b / "usr/bin/sh")
    os.symlink("/bin/dash", b / "usr/bin/sh")
    shutil.rmtree(b / "empty")
    (b / "empty").write_text("")
    os.chmod(b / "empty", 0o755)  # as the directory's: only the type differs
    (a / "only-a").write_text("a\n")
    (b / "only-b").write_text("b\n")
    os.unlink(b / "usr/bin/bash-hl")
    shutil.copy(b / "usr/bin/bash", b / "usr/bin/bash-hl")

    left, right = _snapshot(tmp_path, "a", a), _snapshot(tmp_path, "b", b)
    identical, differences = compare.compare_manifests(left.manifest(KEY), right.manifest(KEY))

    assert [d.describe() for d in differences] == [
        "empty: type (dir / file)",
        "home/tester/notes: owner (1000:1001 / 1000:1000)",
        "only-a: only in build a",
        "only-b: only in build b",
        "usr/bin/bash: content (5000 bytes / 5000 bytes)",
        # A copy in place of the hard link: the link, and with it the shared xattr, are gone.
        "usr/bin/bash-hl: content (5000 bytes / 5000 bytes), xattrs (user.lfs.note / none), "
        "hard link (usr/bin/bash / none)",
        "usr/bin/sh: link target (/bin/bash / /bin/dash)",
        "usr/bin/su: mode (0o4755 / 0o755)",
    ]
    assert identical == len(left.manifest(KEY).entries) - 7


def test_a_file_is_read_back_from_the_layer_that_carries_it(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    make_tree(tree)
    store = SnapshotStore(tmp_path / "store")
    store.create(tree, "base", stage="s0")
    (tree / "late").write_bytes(b"written by the second stage\n")
    store.create(tree, KEY, stage="s1", parent="base")
    manifest = store.manifest(KEY)
    assert manifest.delta_of == "base" and manifest.entries["usr/bin/bash"].layer == "base"

    expected = {
        "usr/bin/bash": b"\x7fELF bash " * 500,
        "usr/bin/bash-hl": b"\x7fELF bash " * 500,  # a hard link: its group's data
        "late": b"written by the second stage\n",
    }
    wanted = {path: tmp_path / path.replace("/", "_") for path in expected}
    compare.extract_files(store, manifest, wanted)
    assert {path: wanted[path].read_bytes() for path in expected} == expected

    with pytest.raises(SnapshotError, match="'usr/bin/sh' is no regular file"):
        compare.extract_files(store, manifest, {"usr/bin/sh": tmp_path / "sh"})


def _state(run_id: str, checkpoints: dict[str, str]) -> RunState:
    return RunState(run_id=run_id, lfs="/x", files=[], checkpoints=checkpoints)


def test_the_report_names_the_first_differing_stage_and_what_each_stage_adds(
    tmp_path: Path,
) -> None:
    trees = {}
    for side in ("a", "b"):
        trees[side] = tmp_path / side
        (trees[side] / "usr").mkdir(parents=True)
        (trees[side] / "usr" / "same").write_text("same\n")
    stores = {side: SnapshotStore(tmp_path / f"store-{side}") for side in trees}
    for side, tree in trees.items():
        stores[side].create(tree, "k1", stage="one")
    for side, tree in trees.items():
        (tree / "usr" / "tool").write_text("tool\n")
        os.chmod(tree / "usr" / "tool", 0o755 if side == "a" else 0o700)
        stores[side].create(tree, "k2", stage="two", parent="k1")
    for side, tree in trees.items():
        (tree / "usr" / "stamp").write_text(f"built by {side}\n")
        stores[side].create(tree, "k3", stage="three", parent="k2")
    keys = {"one": "k1", "two": "k2", "three": "k3"}

    stages = compare_builds(
        ["one", "two", "three"],
        (stores["a"], _state("ra", keys)),
        (stores["b"], _state("rb", keys)),
    )
    report = ReproducibilityReport("ra", "rb", stages, diffoscope_note="diffoscope: none")

    assert not report.reproducible
    assert report_lines(report) == [
        "stage one (checkpoint k1): 3 identical, 0 differ",
        "stage two (checkpoint k2): 3 identical, 1 differ",
        "stage three (checkpoint k3): 3 identical, 2 differ",
        "not reproducible: the first stage that differs is two",
        "two: 1 differ",
        "  usr/tool: mode (0o755 / 0o700)",
        "three: 1 differ that did not at the stage before (1 still differ as before)",
        "  usr/stamp: content (11 bytes / 11 bytes)",
        compare.MTIMES_NOT_COMPARED,
        "diffoscope: none",
    ]
    assert report.as_json()["first_differing_stage"] == "two"
    assert report.as_json()["mtimes_compared"] is False


def test_checkpoints_of_different_inputs_are_not_compared(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "store")
    with pytest.raises(LfsorchError, match="the two builds had different inputs"):
        compare_builds(
            ["one"], (store, _state("ra", {"one": "k1"})), (store, _state("rb", {"one": "k2"}))
        )


def test_an_identical_report_says_so() -> None:
    stage = StageComparison("one", "k" * 64, 5, [])
    assert report_lines(ReproducibilityReport("ra", "rb", [stage])) == [
        f"stage one (checkpoint {'k' * 12}): 5 identical, 0 differ",
        "reproducible: every stage's checkpoint is the same in both builds",
        compare.MTIMES_NOT_COMPARED,
    ]
