"""Figures read from each container's own counters as it ends, on the real engine."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator.workspace import Workspace
from tests.helpers import BASE_IMAGE, run_build, run_cli

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leftovers")]

WriteStage = Callable[[str, str], Path]


def test_short_and_parallel_packages_get_their_own_figures(
    workspace: Workspace, lfs_dir: Path, stage_file: WriteStage
) -> None:
    path = stage_file(
        "figures.yaml",
        f"""
        stage: figures
        image: {BASE_IMAGE}
        packages:
          - name: short
            script: sleep 0.1
          - name: writer
            script: dd if=/dev/zero of=/mnt/lfs/big bs=1M count=100 status=none
          - name: idle
            script: sleep 3
          - name: libstdc++
            script: echo configuring; echo building
          - name: fails
            script: head -c 5000000 /dev/zero > /mnt/lfs/five; exit 3
        """,
    )
    state, recorded = run_build([path], lfs_dir, workspace, parallel=2)
    assert state.outcome == "failed"
    figures = {p.name: p for p in state.packages}
    for name in ("short", "writer", "idle", "fails"):
        assert figures[name].cpu_seconds is not None and figures[name].cpu_seconds > 0, name
        assert figures[name].memory_peak_bytes, name
        assert figures[name].io_source == "cgroup", name
    assert figures["writer"].write_bytes is not None
    assert figures["writer"].write_bytes >= 100 * (1 << 20)
    assert figures["idle"].write_bytes is not None
    assert figures["idle"].write_bytes < 1 << 20  # its neighbour's writes are not its own
    # A failed build keeps its figures and its exit status.
    assert figures["fails"].exit_code == 3
    assert figures["fails"].write_bytes is not None and figures["fails"].write_bytes >= 5_000_000
    assert figures["writer"].pids_peak is not None
    # Built side by side: the partition's growth is not one package's alone.
    assert figures["writer"].disk_added_bytes is None
    assert not list(lfs_dir.parent.rglob(".counters-*"))

    messages = [
        json.loads(line) for line in (workspace.logs_dir / "events.jsonl").read_text().splitlines()
    ]
    assert {m["event"] for m in messages} == {event.name for event in recorded}
    for message in messages:
        assert_is_a_protocol_message(message)
    kinds = [m["event"] for m in messages]
    assert kinds.index("system.ready") < kinds.index("build.start")
    assert "resource.sample" in kinds
    assert messages[-2]["event"] == "run.complete"
    assert messages[-1]["event"] == "system.shutdown"
    assert messages[-1]["payload"]["data"] == {"reason": "failed"}
    progress = [m for m in messages if m["event"] == "build.progress"]
    assert {m["target"] for m in progress} >= {"figures/libstdc++"}


def assert_is_a_protocol_message(message: dict[str, Any]) -> None:
    assert list(message) == ["event", "timestamp", "source", "target", "priority", "payload"]
    moment = datetime.datetime.fromisoformat(message["timestamp"])
    assert moment.utcoffset() == datetime.timedelta(0)
    assert isinstance(message["event"], str) and "." in message["event"]
    assert message["source"] in {"scheduler", "builder", "checkpoints", "engine", "monitor"}
    assert isinstance(message["target"], str) and message["target"]
    assert message["priority"] in {"debug", "info", "warning", "error"}
    assert list(message["payload"]) == ["data", "context"]
    assert isinstance(message["payload"]["data"], dict)
    assert message["payload"]["context"]["run_id"]


def test_a_filesystem_below_its_threshold_is_shown_and_logged(
    workspace: Workspace, lfs_dir: Path, stage_file: WriteStage
) -> None:
    path = stage_file(
        "tiny.yaml",
        f"""
        stage: tiny
        image: {BASE_IMAGE}
        packages:
          - name: one
            script: "true"
        """,
    )
    # The same threshold stops the run before its first package (the disk strategy); the
    # sampler has reported both filesystems by then.
    result = run_cli(
        "run", str(path), "--lfs", str(lfs_dir),
        "-o", "recovery.min_free_space=1000000g", "-o", "recovery.space_wait=1s",
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert f"  host   partition ({lfs_dir}): low, " in result.stdout
    assert "(threshold 976TiB)" in result.stdout
    messages = [
        json.loads(line) for line in (workspace.logs_dir / "events.jsonl").read_text().splitlines()
    ]
    depleted = [m for m in messages if m["event"] == "resource.depleted"]
    assert {m["target"] for m in depleted} == {"partition", "workspace"}
    assert all(m["priority"] == "warning" for m in depleted)


def test_containers_lfsorch_kills_keep_their_cgroup_figures(
    workspace: Workspace, lfs_dir: Path, stage_file: WriteStage
) -> None:
    path = stage_file(
        "killed.yaml",
        f"""
        stage: killed
        image: {BASE_IMAGE}
        packages:
          - name: endless
            timeout: 3s
            # Busy and holding about 50 MB when its timeout comes.
            script: head -c 50000000 /dev/zero | tail -n 1 | sleep 300
        """,
    )
    state, _ = run_build([path], lfs_dir, workspace)
    (endless,) = state.packages
    assert endless.timed_out and endless.status == "failed"
    # Read from its own cgroup before the kill, not Docker's stats frames (a lower bound,
    # none at all for a short package).
    assert endless.io_source == "cgroup"
    assert endless.cpu_seconds is not None and endless.cpu_seconds > 0
    assert endless.memory_peak_bytes is not None and endless.memory_peak_bytes >= 40_000_000
    assert endless.pids_peak is not None and endless.pids_peak >= 3
    assert not list(lfs_dir.parent.rglob(".counters-*"))
