"""Local files lfsorch cannot use: one readable line with what to do, never a traceback, and
a run record that never says `running` after the tool stopped."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zstandard

from orchestrator.checkpoints.store import MANIFEST, PLAIN_MANIFEST, SnapshotStore
from orchestrator.workspace import Workspace
from tests.helpers import BASE_IMAGE, run_cli

WriteStage = Callable[[str, str], Path]
Canary = Callable[[], dict[str, tuple[bytes | None, int]]]

NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
MOVE_ASIDE = "  hint: move it aside and run again\n"


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def outcomes(workspace: Path) -> list[str]:
    """The outcome in every run record the workspace holds."""
    found = []
    for record in sorted(workspace.rglob("state.json")):
        if record.is_file():
            found.append(json.loads(record.read_text())["outcome"])
    return found


@pytest.fixture
def small_stage(stage_file: WriteStage) -> Path:
    return stage_file(
        "small.yaml",
        f"stage: small\nimage: {BASE_IMAGE}\n"
        "packages: [{name: a, script: 'echo a > /mnt/lfs/a'}]\n",
    )


# ------------------------------------------------------------------ configuration


def test_a_configuration_path_that_is_a_directory(tmp_path: Path) -> None:
    result = run_cli("config", "show", env={"LFSORCH_CONFIG": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr == (
        f"error: {tmp_path}: cannot read the configuration file (Is a directory)\n"
        "  hint: point LFSORCH_CONFIG at a YAML file, or remove what is there\n"
    )


def test_a_binary_configuration_file(tmp_path: Path) -> None:
    binary = tmp_path / "config.yaml"
    binary.write_bytes(bytes(range(256)))
    result = run_cli("config", "show", env={"LFSORCH_CONFIG": str(binary)})
    assert result.returncode == 2
    assert result.stderr == (
        f"error: {binary}: not a text file (a configuration file is UTF-8 YAML)\n"
        "  hint: point LFSORCH_CONFIG at the YAML file, or remove it\n"
    )
    assert binary.read_bytes() == bytes(range(256))


# ------------------------------------------------------------------ manifests


@pytest.mark.parametrize(
    ("content", "reason", "form"),
    [
        (b"{not json", "unexpected character", "compressed"),
        (b"{not json", "unexpected character", "plain"),
        (b"[]", "'list' object has no attribute 'get'", "compressed"),
        (b'{"version": 1}', "'archive'", "plain"),
        (bytes(range(256)), "not valid utf-8", "compressed"),
        (b'{"version": 1}', "not zstd data", "not compressed"),
    ],
)
def test_one_malformed_manifest_does_not_hide_the_other_snapshots(
    workspace: Workspace, tmp_path: Path, content: bytes, reason: str, form: str
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_bytes(b"x\n")
    store = SnapshotStore(workspace.snapshots_dir)
    store.create(tree, "a" * 64, stage="good")
    store.create(tree, "b" * 64, stage="bad")
    manifest = workspace.snapshots_dir / ("b" * 64) / MANIFEST
    if form == "plain":  # as a store written before manifests were compressed holds them
        manifest.unlink()
        manifest = manifest.with_name(PLAIN_MANIFEST)
    written = zstandard.compress(content) if form == "compressed" else content
    manifest.write_bytes(written)

    listed = run_cli("snapshots", "list")

    assert listed.returncode == 0, listed.stderr
    first, *rest = listed.stdout.splitlines()
    assert first.startswith(f"broken: snapshot {'b' * 64}: manifest {manifest} is unreadable (")
    assert reason.lower() in first.lower()
    assert any("a" * 16 in line and "good" in line for line in rest)
    shown = run_cli("snapshots", "show", "b" * 64)
    assert shown.returncode == 1
    assert shown.stderr.startswith(f"error: snapshot {'b' * 64}: manifest {manifest} is unreadable")
    assert "Traceback" not in shown.stderr
    assert manifest.read_bytes() == written


# ------------------------------------------------------------------ the workspace's own files


@pytest.mark.docker
@pytest.mark.usefixtures("no_leftovers")
def test_state_json_that_is_a_directory(
    workspace: Workspace, lfs_dir: Path, small_stage: Path, canary: Canary
) -> None:
    before = canary()
    first = run_cli("run", str(small_stage), "--lfs", str(lfs_dir))
    assert first.returncode == 0, first.stderr
    workspace.state_file.unlink()
    workspace.state_file.mkdir()

    result = run_cli("run", str(small_stage), "--lfs", str(lfs_dir), "--rebuild")

    assert result.returncode == 1
    assert result.stderr == (
        f"error: the run record {workspace.state_file} is a directory where a file belongs\n"
        + MOVE_ASIDE
    )
    # The partition's record and the run's own say how it ended, not `running`.
    # (the partition's record, the first run's, the second run's)
    assert sorted(outcomes(workspace.root)) == ["failed", "failed", "succeeded"]
    assert workspace.state_file.is_dir() and list(workspace.state_file.iterdir()) == []
    assert canary() == before


@pytest.mark.docker
def test_events_log_that_is_a_directory(
    workspace: Workspace, lfs_dir: Path, small_stage: Path
) -> None:
    log = workspace.logs_dir / "events.jsonl"
    log.mkdir(parents=True)
    result = run_cli("run", str(small_stage), "--lfs", str(lfs_dir))
    assert result.returncode == 1
    assert result.stderr == f"error: {log} is a directory where a file belongs\n" + MOVE_ASIDE
    assert "running" not in outcomes(workspace.root)
    assert list(lfs_dir.iterdir()) == [] or [p.name for p in lfs_dir.iterdir()] == [
        ".lfsorch-partition"
    ]


@NEEDS_ROOT
@pytest.mark.docker
def test_a_read_only_workspace(
    tmp_path: Path, lfs_dir: Path, small_stage: Path, canary: Canary
) -> None:
    before = canary()
    with tmpfs(tmp_path / "ro", "ro,size=1m") as root:
        env = {"LFSORCH_HOME": str(root)}
        run = run_cli("run", str(small_stage), "--lfs", str(lfs_dir), env=env)
        restore = run_cli("restore", "small", "--lfs", str(lfs_dir), env=env)
        cleanup = run_cli("cleanup", env=env)
    hint = "  hint: point LFSORCH_HOME at a writable directory (or remount it read-write)\n"
    assert (run.returncode, run.stderr) == (
        1,
        f"error: {root}/logs is on a read-only file system\n" + hint,
    )
    for result in (restore, cleanup):
        assert (result.returncode, result.stderr) == (
            1,
            f"error: {root}/run.lock is on a read-only file system\n" + hint,
        )
    assert canary() == before


@NEEDS_ROOT
@pytest.mark.docker
@pytest.mark.usefixtures("no_leftovers")
def test_a_full_workspace_disk(
    tmp_path: Path, lfs_dir: Path, stage_file: WriteStage, canary: Canary
) -> None:
    stage = stage_file(
        "fill.yaml",
        f"stage: fill\nimage: {BASE_IMAGE}\n"
        "packages: [{name: blob, script: 'head -c 3000000 /dev/urandom > /mnt/lfs/blob'}]\n",
    )
    before = canary()
    with tmpfs(tmp_path / "full", "size=1m") as root:
        # No free-space threshold: the snapshot store's own handling of a full disk is tested.
        no_threshold = ("-o", "recovery.min_free_space=1")
        result = run_cli(
            "run", str(stage), "--lfs", str(lfs_dir), *no_threshold, env={"LFSORCH_HOME": str(root)}
        )
        records = outcomes(root)
        listed = run_cli("runs", "--json", env={"LFSORCH_HOME": str(root)})
        leftovers = [p.name for p in (root / "snapshots").iterdir() if p.name.startswith(".")]
    assert result.returncode == 1
    assert result.stderr.endswith(
        f"error: the snapshot store {root}/snapshots cannot be written: no space left on its "
        "device\n  hint: free space (e.g. `lfsorch snapshots prune --keep N`) or point "
        "LFSORCH_HOME at a larger disk\n"
    )
    assert "Traceback" not in result.stderr and "Logging error" not in result.stderr
    assert records == ["failed", "failed", "failed"]
    assert [run["outcome"] for run in json.loads(listed.stdout)] == ["failed"]
    assert leftovers == []
    assert (lfs_dir / "blob").stat().st_size == 3_000_000
    assert canary() == before
