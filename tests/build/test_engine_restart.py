"""The engine goes away mid-package: a second Docker engine, started by the test on its own
socket, data root and exec root, is killed (SIGKILL) while a package builds and started again.
The run waits for it, removes what is left of the package's container, restores the checkpoint
before the package and builds it again; it ends `succeeded`. The machine's own engine is never
touched."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest

from orchestrator.execution import engine
from orchestrator.workspace import Workspace
from tests.helpers import BASE_IMAGE, mounts_under, run_cli, start_cli, wait_for_container

pytestmark = [pytest.mark.docker]

WriteStage = Callable[[str, str], Path]
# One directory per test process: two test sessions on one machine each start their own
# engine, and a fixed path would let one remove the other's data root.
ROOT = Path(f"/var/tmp/lfsorch-test-engine-{os.getpid()}")
SOCKET = ROOT / "docker.sock"
HOST = f"unix://{SOCKET}"
DATA_ROOT = ROOT / "data"


def _dockerd_command() -> list[str]:
    # In a network namespace of its own: `--bridge none` makes dockerd delete the interface
    # docker0 where it starts, which is the machine's engine's bridge in the host's namespace.
    return [
        "unshare", "--net", "--",
        "dockerd",
        "--host", HOST,
        "--data-root", str(DATA_ROOT),
        "--exec-root", str(ROOT / "exec"),
        "--pidfile", str(ROOT / "docker.pid"),
        "--bridge", "none",
        "--iptables=false",
    ]  # fmt: skip


class OwnEngine:
    """A dockerd of the test's own; `kill` and `start` act on it alone, by its pid."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.client: docker.DockerClient | None = None

    def start(self) -> None:
        log = (ROOT / "dockerd.log").open("ab")
        self.process = subprocess.Popen(_dockerd_command(), stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (ROOT / "dockerd.log").read_text()[-2000:]
            with contextlib.suppress(Exception):
                self.client = docker.DockerClient(base_url=HOST, timeout=30)
                self.client.ping()
                return
            time.sleep(0.2)
        raise AssertionError("the test engine did not answer within 60s")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)


def _containerd_pid() -> int | None:
    """The engine's own containerd, which outlives a killed dockerd."""
    with contextlib.suppress(OSError, ValueError):
        return int((ROOT / "exec" / "containerd" / "containerd.pid").read_text())
    return None


@pytest.fixture
def test_engine() -> Iterator[OwnEngine]:
    if shutil.which("dockerd") is None:
        if os.environ.get("CI"):
            pytest.fail("dockerd is not installed: the engine-restart test needs a second engine")
        pytest.skip("dockerd is not installed: cannot start a second engine for this test")
    if os.geteuid() != 0:
        pytest.skip("starting a second Docker engine needs root")
    if shutil.which("unshare") is None:
        pytest.skip("unshare is missing: the second engine needs a network namespace of its own")
    ROOT.mkdir(parents=True, exist_ok=True)
    machine_bridge = Path("/sys/class/net/docker0").exists()
    owned = OwnEngine()
    try:
        owned.start()
        saved = subprocess.Popen(["docker", "save", BASE_IMAGE], stdout=subprocess.PIPE)
        subprocess.run(
            ["docker", "load"],
            stdin=saved.stdout,
            env={**os.environ, "DOCKER_HOST": HOST},
            check=True,
            capture_output=True,
        )
        assert saved.wait(timeout=300) == 0
        yield owned
    finally:
        owned.stop()
        containerd = _containerd_pid()
        if containerd is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(containerd, signal.SIGTERM)
        # dockerd bind-mounts its data root onto itself; nothing may stay mounted here.
        for point in mounts_under(ROOT):
            subprocess.run(["umount", point], check=False)
        if not mounts_under(ROOT):
            shutil.rmtree(ROOT, ignore_errors=True)
    assert Path("/sys/class/net/docker0").exists() == machine_bridge, "the host's bridge changed"


def test_engine_killed_mid_package_the_run_goes_on(
    test_engine: OwnEngine, workspace: Workspace, lfs_dir: Path, stage_file: WriteStage
) -> None:
    path = stage_file(
        "restart.yaml",
        f"""
        stage: restart
        image: {BASE_IMAGE}
        checkpoint: package
        packages:
          - name: first
            script: echo built >> /mnt/lfs/first
          - name: second
            depends: [first]
            script: |
              if [ "$LFSORCH_ATTEMPT" = 1 ]; then echo half > /mnt/lfs/half; sleep 300; fi
              echo built >> /mnt/lfs/second
          - name: third
            depends: [second]
            script: echo built >> /mnt/lfs/third
        """,
    )
    home = workspace.root
    env = {"DOCKER_HOST": HOST}
    run = start_cli("run", str(path), "--lfs", str(lfs_dir), home=home, env=env)
    try:
        assert test_engine.client is not None
        wait_for_container(test_engine.client, "second", owner=run.pid, timeout=120)
        test_engine.kill()
        time.sleep(3)  # the run finds the engine gone and waits for it
        test_engine.start()
        output, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, output
    assert "system failure of restart/second (attempt 1), wait-engine" in output
    for name in ("first", "second", "third"):
        assert (lfs_dir / name).read_text() == "built\n"  # each built once, none on top
    assert not (lfs_dir / "half").exists()  # the killed attempt's files: restored away

    status = json.loads(run_cli("status", "--json", home=home, env=env, check=True).stdout)
    attempts = {p["name"]: p["attempt_log"] for p in status["packages"]}
    assert status["outcome"] == "succeeded"
    assert [len(attempts[name]) for name in ("first", "second", "third")] == [1, 2, 1]
    lost = attempts["second"][0]
    assert (lost["failure_class"], lost["strategy"]) == ("system", "wait-engine")
    assert lost["error"].startswith(f"the engine at {HOST} stopped answering during the build")
    assert test_engine.client is not None
    left = engine.managed_containers(test_engine.client)
    assert left == [], [engine.container_name(listed) for listed in left]
