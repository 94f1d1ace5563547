"""`lfsorch run` against the real Docker engine: packages really built in fresh containers."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import docker
import pytest

from orchestrator import api
from orchestrator.config import load_config
from orchestrator.execution import engine
from orchestrator.monitor.events import Event
from orchestrator.workspace import Workspace
from tests.helpers import BASE_IMAGE, REPO, run_build, start_cli, wait_for_container

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leftovers")]

WriteStage = Callable[[str, str], Path]


def names(events: list[Event], kind: str) -> list[str]:
    return [str(e.package) for e in events if e.name == kind]


def of_stage(client: docker.DockerClient, stage: str) -> list[docker.models.containers.Container]:
    return client.containers.list(all=True, filters={"label": f"{engine.STAGE}={stage}"})


def test_demo_stage_builds_into_the_partition(workspace: Workspace, lfs_dir: Path) -> None:
    state, recorded = run_build([REPO / "stages/demo.yaml"], lfs_dir, workspace, parallel=2)
    assert state.outcome == "succeeded"
    release = (lfs_dir / "etc/demo-release").read_text().splitlines()
    assert [line.split()[1] for line in release] == [
        "/mnt/lfs/usr/bin/hello",
        "/mnt/lfs/usr/bin/crc32",
    ]
    completed = names(recorded, "build.complete")
    assert completed.index("layout") < completed.index("libgreet") < completed.index("hello")
    assert completed[-1] == "release"
    assert (lfs_dir / "usr/lib/libgreet.a").stat().st_size > 0
    log = Path(state.find("demo", "hello").log)
    assert log.read_text().startswith("=== lfsorch: demo/hello attempt 1 ===")


def test_container_contract(
    workspace: Workspace, lfs_dir: Path, stage_file: WriteStage, docker_client: docker.DockerClient
) -> None:
    """Clean environment, the stage's user and workdir, no network, limits, labels."""
    path = stage_file(
        "contract.yaml",
        f"""
        stage: contract
        image: {BASE_IMAGE}
        user: nobody
        workdir: /tmp
        environment: {{LFS: /mnt/lfs, TOOLS: "$LFS/tools"}}
        resources: {{cpus: 1, memory: 128m, pids: 64}}
        packages:
          - name: look
            environment: {{EXTRA: "${{TOOLS}}/bin"}}
            script: |
              env | grep -v '^_=' | sort > /tmp/env.txt
              {{ cat /tmp/env.txt; id -un; pwd; ls /sys/class/net; cat /sys/fs/cgroup/pids/pids.max;
                 cat /sys/fs/cgroup/memory/memory.limit_in_bytes; }} >&2
              sleep 1.5
        """,
    )
    seen_labels: dict[str, str] = {}

    def watch() -> None:
        wait_for_container(docker_client, "look", owner=os.getpid())
        found = docker_client.containers.list(filters={"label": f"{engine.PACKAGE}=look"})
        seen_labels.update(found[0].labels)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    state = api.run(
        [path], lfs_dir, config=load_config(["makeflags=-j7"]), parallel=1, workspace=workspace
    )
    assert state.outcome == "succeeded"
    output = Path(state.packages[0].log or "").read_text().splitlines()[1:]
    assert output == [
        "EXTRA=/mnt/lfs/tools/bin",
        "HOME=/nonexistent",
        "LFS=/mnt/lfs",
        "LFSORCH_ATTEMPT=1",
        "MAKEFLAGS=-j7",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "PWD=/tmp",
        "SHLVL=1",
        "SOURCE_DATE_EPOCH=1677628800",
        "TOOLS=/mnt/lfs/tools",
        "nobody",
        "/tmp",
        "lo",
        "64",
        str(128 << 20),
    ]
    assert seen_labels[engine.RUN] == state.run_id
    assert seen_labels[engine.STAGE] == "contract"
    assert seen_labels[engine.OWNER_PID] == str(os.getpid())


def test_failure_stops_dependents_and_reports_exit_status(
    workspace: Workspace, lfs_dir: Path, stage_file: WriteStage
) -> None:
    path = stage_file(
        "fail.yaml",
        f"""
        stage: fail
        image: {BASE_IMAGE}
        checkpoint: none  # resuming in place; resuming onto checkpoints: test_checkpoints.py
        packages:
          - {{name: base, script: "touch /mnt/lfs/base"}}
          - name: broken
            depends: [base]
            script: |
              echo "configure: error: no acceptable C compiler found in \\$PATH"
              exit 3
          - {{name: after-broken, depends: [broken], script: "touch /mnt/lfs/after"}}
          - {{name: unrelated, depends: [base], script: "touch /mnt/lfs/unrelated"}}
        """,
    )
    state, recorded = run_build([path], lfs_dir, workspace)
    statuses = {p.name: (p.status, p.exit_code) for p in state.packages}
    assert statuses == {
        "base": ("done", 0),
        "broken": ("failed", 3),
        "after-broken": ("skipped", None),
        "unrelated": ("done", 0),
    }
    assert not (lfs_dir / "after").exists()
    assert names(recorded, "build.skipped") == ["after-broken"]
    assert state.outcome == "failed"

    # The CLI's summary names the failure, its exit status, its log's last lines and the log.
    rerun = start_cli("run", str(path), "--lfs", str(lfs_dir))
    output, _ = rerun.communicate(timeout=120)
    assert rerun.returncode == 1
    assert "FAILED fail/broken: exit status 3" in output
    assert "  | configure: error: no acceptable C compiler found in $PATH" in output
    assert "whole log: " in output
    # Done packages were not built again.
    again = api.last_run(workspace)
    assert again is not None
    assert {p.name: len(p.attempts) for p in again.packages} == {
        "base": 1,
        "broken": 2,
        "after-broken": 0,
        "unrelated": 1,
    }


def test_retries_until_success(workspace: Workspace, lfs_dir: Path, stage_file: WriteStage) -> None:
    path = stage_file(
        "retry.yaml",
        f"""
        stage: retry
        image: {BASE_IMAGE}
        retries: 0
        packages:
          - name: flaky
            retries: 2
            script: |
              echo x >> /mnt/lfs/tries
              [ "$(wc -l < /mnt/lfs/tries)" -ge 3 ]
        """,
    )
    state, recorded = run_build([path], lfs_dir, workspace)
    package = state.packages[0]
    assert package.status == "done"
    assert [(a.number, a.exit_code) for a in package.attempts] == [(1, 1), (2, 1), (3, 0)]
    assert [e.data["attempt"] for e in recorded if e.name == "build.retry"] == [2, 3]


def test_memory_limit_kill_is_recorded(
    workspace: Workspace, lfs_dir: Path, stage_file: WriteStage
) -> None:
    path = stage_file(
        "oom.yaml",
        f"""
        stage: oom
        image: {BASE_IMAGE}
        resources: {{memory: 64m}}
        recovery: {{memory_cap: 64m}}
        packages:
          - name: hog
            environment: {{MAKEFLAGS: -j1}}
            script: |
              # A child is killed; a careless script would carry on and exit 0.
              big=$(head -c 300000000 /dev/zero | tr '\\0' x) || true
              echo "carried on"
        """,
    )
    state, _ = run_build([path], lfs_dir, workspace)
    package = state.packages[0]
    assert package.oom_killed is True
    assert package.status == "failed"
    assert package.attempts[-1].error.startswith("killed by the kernel's OOM killer")
    # At -j1 and at its cap: nothing a retry could change.
    assert len(package.attempts) == 1
    assert (package.attempts[0].failure_class, package.attempts[0].strategy) == ("memory", "fail")


def test_timeout_kills_the_container(
    workspace: Workspace, lfs_dir: Path, stage_file: WriteStage
) -> None:
    path = stage_file(
        "slow.yaml",
        f"""
        stage: slow
        image: {BASE_IMAGE}
        packages:
          - {{name: sleeper, timeout: 2s, script: "sleep 120"}}
        """,
    )
    started = time.monotonic()
    state, _ = run_build([path], lfs_dir, workspace)
    package = state.packages[0]
    assert time.monotonic() - started < 30
    assert (package.status, package.timed_out) == ("failed", True)
    assert package.attempts[-1].error.startswith("timed out after 2s")


def test_independent_packages_run_side_by_side(
    workspace: Workspace, lfs_dir: Path, stage_file: WriteStage
) -> None:
    path = stage_file(
        "wide.yaml",
        f"""
        stage: wide
        image: {BASE_IMAGE}
        packages:
          - name: a
            script: date +%s.%N > /mnt/lfs/a.start; sleep 2; date +%s.%N > /mnt/lfs/a.end
          - name: b
            script: date +%s.%N > /mnt/lfs/b.start; sleep 2; date +%s.%N > /mnt/lfs/b.end
        """,
    )
    state, _ = run_build([path], lfs_dir, workspace, parallel=2)
    assert state.outcome == "succeeded"

    def read(name: str) -> float:
        return float((lfs_dir / name).read_text())

    assert read("a.start") < read("b.end") and read("b.start") < read("a.end")


def test_interrupt_stops_and_removes_containers(
    workspace: Workspace, lfs_dir: Path, stage_file: WriteStage, docker_client: docker.DockerClient
) -> None:
    path = stage_file(
        "long.yaml",
        f"""
        stage: long
        image: {BASE_IMAGE}
        packages:
          - {{name: first, script: "touch /mnt/lfs/first"}}
          - {{name: endless, depends: [first], script: "sleep 300"}}
        """,
    )
    process = start_cli("run", str(path), "--lfs", str(lfs_dir))
    wait_for_container(docker_client, "endless", owner=process.pid)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    assert "interrupted: running containers were stopped and removed" in output
    assert of_stage(docker_client, "long") == []
    state = api.last_run(workspace)
    assert state is not None and state.outcome == "interrupted"
    assert {p.name: p.status for p in state.packages} == {"first": "done", "endless": "pending"}


def test_sigterm_behaves_like_ctrl_c(
    workspace: Workspace, lfs_dir: Path, stage_file: WriteStage, docker_client: docker.DockerClient
) -> None:
    path = stage_file(
        "term.yaml",
        f"stage: term\nimage: {BASE_IMAGE}\n"
        "packages:\n  - {name: endless, script: 'sleep 300'}\n",
    )
    process = start_cli("run", str(path), "--lfs", str(lfs_dir))
    wait_for_container(docker_client, "endless", owner=process.pid)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode == 130
    assert of_stage(docker_client, "term") == []


def test_killed_tool_leftovers_are_removed_and_done_work_is_kept(
    workspace: Workspace, lfs_dir: Path, stage_file: WriteStage, docker_client: docker.DockerClient
) -> None:
    path = stage_file(
        "crash.yaml",
        f"""
        stage: crash
        image: {BASE_IMAGE}
        checkpoint: none  # resuming in place; resuming onto checkpoints: test_checkpoints.py
        packages:
          - {{name: first, script: "echo built >> /mnt/lfs/first"}}
          - name: second
            depends: [first]
            script: |
              [ -e /mnt/lfs/go ] || sleep 300
              touch /mnt/lfs/second
        """,
    )
    process = start_cli("run", str(path), "--lfs", str(lfs_dir))
    wait_for_container(docker_client, "second", owner=process.pid)
    process.kill()
    process.communicate(timeout=30)
    leftovers = of_stage(docker_client, "crash")
    assert [c.labels[engine.PACKAGE] for c in leftovers] == ["second"]

    (lfs_dir / "go").touch()
    state, recorded = run_build([path], lfs_dir, workspace)
    cleanup = [e for e in recorded if e.name == "engine.cleanup"]
    assert cleanup and cleanup[0].data["removed"] == [leftovers[0].name]
    assert state.outcome == "succeeded"
    assert (lfs_dir / "first").read_text() == "built\n"  # not built twice
    assert names(recorded, "build.start") == ["second"]


def test_status_json_reports_each_package(
    workspace: Workspace, lfs_dir: Path, stage_file: WriteStage
) -> None:
    path = stage_file(
        "busy.yaml",
        f"""
        stage: busy
        image: {BASE_IMAGE}
        packages:
          - name: work
            script: |
              # Long enough for Docker's stats stream (one frame a second) to see it.
              x=$(head -c 20000000 /dev/zero | tr '\\0' x); end=$((SECONDS + 3))
              while [ $SECONDS -lt $end ]; do :; done
        """,
    )
    run_build([path], lfs_dir, workspace)
    process = start_cli("status", "--json")
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0
    status = json.loads(output)
    package = status["packages"][0]
    assert {k: package[k] for k in ("stage", "name", "status", "attempts", "exit_code")} == {
        "stage": "busy",
        "name": "work",
        "status": "done",
        "attempts": 1,
        "exit_code": 0,
    }
    assert package["oom_killed"] is False
    assert package["duration_s"] >= 2
    assert package["cpu_seconds"] > 0.2  # a busy loop of 3 s, on a machine that may be loaded
    assert package["memory_peak_bytes"] >= 20_000_000
    assert package["io_source"] == "cgroup"
    assert package["read_bytes"] >= 0 and package["write_bytes"] >= 0


def test_no_engine_is_one_line_and_offline_commands_still_work(
    workspace: Workspace, lfs_dir: Path
) -> None:
    env = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    process = start_cli("run", str(REPO / "stages/demo.yaml"), "--lfs", str(lfs_dir), env=env)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 3
    (line,) = output.strip().splitlines()
    assert line.startswith("error: no Docker engine answers at unix:///nonexistent/docker.sock: ")
    assert line.endswith(
        "start the Docker engine (for example `dockerd &`) or point DOCKER_HOST at one; "
        "`lfsorch validate`, `plan` and `schema` work without it"
    )
    for command in (["validate"], ["plan", "--json"]):
        check = start_cli(*command, str(REPO / "stages/demo.yaml"), env=env)
        check.communicate(timeout=60)
        assert check.returncode == 0
