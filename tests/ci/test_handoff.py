"""Two real runners hand a build over through a real registry.

A registry (Debian's `docker-registry`) serves one storage directory. Runner A is the
machine's engine: it locks the plan (pushing the build-host image), plans the jobs, and runs
the first job, which pushes its checkpoint image. Runner B is a second dockerd started here
with its own socket, data root and exec root, and no images: it runs the second job, which
pulls the host image by the lock's digest and A's checkpoint, builds only the rest and pushes
the final checkpoint. That checkpoint's key and manifest equal a single-runner build's.

B runs in a network namespace of its own (`--bridge none` deletes the bridge of the namespace
it starts in, which must never be the host's), so A's loopback is not B's. The registry is
therefore served twice from the same storage directory: once on 127.0.0.1:PORT in the host's
namespace, for A, and once on 127.0.0.1:PORT inside B's namespace, for B. Both runners then
pull and push the same `127.0.0.1:PORT/...` references, as the lock records them, with no
route between the namespaces.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml

from orchestrator.build.state import load_state
from orchestrator.checkpoints.store import IMAGE_REPOSITORY, SnapshotStore
from orchestrator.execution import engine
from orchestrator.workspace import Workspace
from tests.helpers import BASE_IMAGE, mounts_under, run_cli, start_cli, wait_for_container

pytestmark = [pytest.mark.docker]

WriteStage = Callable[[str, str], Path]
# Clamp every mtime the package left to SOURCE_DATE_EPOCH, so two builds give equal manifests.
CLAMP = (
    "find /mnt/lfs -path /mnt/lfs/.lfsorch-partition -prune -o "
    '-exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +'
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answers(url: str, prefix: list[str]) -> bool:
    """Whether `url` answers 200, asked from the namespace `prefix` enters (none: this one)."""
    if not prefix:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as answer:
            return bool(answer.status == 200)
        return False
    probe = f"import urllib.request; urllib.request.urlopen({url!r}, timeout=2)"
    asked = subprocess.run([*prefix, sys.executable, "-c", probe], capture_output=True)
    return asked.returncode == 0


def _wait_for(url: str, prefix: list[str], process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-2000:]
        if _answers(url, prefix):
            return
        time.sleep(0.2)
    raise AssertionError(f"the registry at {url} did not answer within 60s")


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


class Registry:
    """`docker-registry serve` with its own configuration and storage directory."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.config = root / "registry.yml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "version": 0.1,
                    "log": {"level": "warn"},
                    "storage": {"filesystem": {"rootdirectory": str(root / "storage")}},
                    "http": {"addr": f"127.0.0.1:{port}"},
                }
            )
        )
        self.processes: list[subprocess.Popen[bytes]] = []

    def serve(self, prefix: list[str], name: str) -> None:
        """Start one server; `prefix` places it in a namespace (nsenter ...)."""
        log = self.root / f"{name}.log"
        process = subprocess.Popen(
            [*prefix, "docker-registry", "serve", str(self.config)],
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        self.processes.append(process)
        _wait_for(f"http://127.0.0.1:{self.port}/v2/", prefix, process, log)

    def stop(self) -> None:
        for process in self.processes:
            _stop(process)


class RunnerB:
    """A second dockerd in a network namespace of its own, with a registry server beside it."""

    def __init__(self, root: Path, registry: Registry) -> None:
        self.root = root
        self.socket = root / "docker.sock"
        self.host = f"unix://{self.socket}"
        self.registry = registry
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> docker.DockerClient:
        dockerd = [
            "dockerd",
            "--host", self.host,
            "--data-root", str(self.root / "data"),
            "--exec-root", str(self.root / "exec"),
            "--pidfile", str(self.root / "docker.pid"),
            "--bridge", "none",
            "--iptables=false",
            "--insecure-registry", f"127.0.0.1:{self.registry.port}",
        ]  # fmt: skip
        script = f"ip link set lo up && exec {shlex.join(dockerd)}"
        log = (self.root / "dockerd.log").open("ab")
        self.process = subprocess.Popen(
            ["unshare", "--net", "--", "sh", "-c", script], stdout=log, stderr=log
        )
        client = self._wait()
        # B's own registry server: the same storage, on B's loopback (up once dockerd runs).
        self.registry.serve(["nsenter", "--target", str(self.process.pid), "--net", "--"], "b")
        return client

    def _wait(self) -> docker.DockerClient:
        assert self.process is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.root / "dockerd.log").read_text()[-2000:]
            with contextlib.suppress(Exception):
                client = docker.DockerClient(base_url=self.host, timeout=120)
                client.ping()
                return client
            time.sleep(0.2)
        raise AssertionError("runner B's engine did not answer within 120s")

    def stop(self) -> None:
        _stop(self.process)
        with contextlib.suppress(OSError, ValueError, ProcessLookupError):
            containerd = self.root / "exec" / "containerd" / "containerd.pid"
            os.kill(int(containerd.read_text()), signal.SIGTERM)
        # dockerd bind-mounts its data root onto itself; nothing may stay mounted here.
        for point in mounts_under(self.root):
            subprocess.run(["umount", "-l", point], check=False)


def _needs(*programs: str) -> None:
    missing = [program for program in programs if shutil.which(program) is None]
    if missing or os.geteuid() != 0:
        reason = f"the hand-off test needs root and {', '.join(programs)} (missing: {missing})"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def registry(docker_client: docker.DockerClient) -> Iterator[Registry]:
    """A registry on the host's loopback, for the machine's engine (runner A)."""
    _needs("docker-registry")
    root = Path(f"/var/tmp/lfsorch-handoff-{os.getpid()}")
    root.mkdir(parents=True)
    registry = Registry(root, _free_port())
    try:
        registry.serve([], "a")
        yield registry
    finally:
        registry.stop()
        # Only the names this test gave images in the machine's engine: the pushed ones,
        # and the local snapshot images of the checkpoints it pushed.
        pushed = f"127.0.0.1:{registry.port}/"
        for image in docker_client.images.list():
            for tag in image.tags:
                if tag.startswith(pushed):
                    own = [tag]
                    if tag.startswith(f"{pushed}lfsorch/snapshot:"):
                        own.append(f"{IMAGE_REPOSITORY}:{tag.rsplit(':', 1)[1]}")
                    for name in own:
                        with contextlib.suppress(docker.errors.APIError):
                            docker_client.images.remove(name)
        if not mounts_under(root):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def runners(registry: Registry) -> Iterator[tuple[Registry, RunnerB]]:
    _needs("dockerd", "unshare", "nsenter", "ip")
    machine_bridge = Path("/sys/class/net/docker0").exists()
    runner_b = RunnerB(registry.root / "b", registry)
    runner_b.root.mkdir()
    try:
        yield registry, runner_b
    finally:
        runner_b.stop()
    assert not mounts_under(registry.root), "runner B's data root is still mounted"
    assert Path("/sys/class/net/docker0").exists() == machine_bridge, "the host's bridge changed"


def _stage_files(stage_file: WriteStage) -> Path:
    stage_file(
        "one.yaml",
        f"""
        stage: one
        image: {BASE_IMAGE}
        packages:
          - name: a
            sbu: 1
            script: |
              echo a > /mnt/lfs/a
              {CLAMP}
        """,
    )
    return stage_file(
        "two.yaml",
        f"""
        stage: two
        image: {BASE_IMAGE}
        requires: [one]
        packages:
          - name: b
            sbu: 1
            script: |
              mkdir -p /mnt/lfs/usr && echo b > /mnt/lfs/usr/b
              {CLAMP}
          - name: c
            sbu: 1
            depends: [b]
            script: |
              cat /mnt/lfs/a /mnt/lfs/usr/b > /mnt/lfs/usr/c
              {CLAMP}
          - name: d
            sbu: 1
            depends: [c]
            script: |
              ln -s usr/c /mnt/lfs/d && chmod 700 /mnt/lfs/usr
              {CLAMP}
        """,
    )


def _job_commands(workflow: str, lfs: Path) -> list[list[str]]:
    """The `lfsorch ci job` command of each job, as the GitLab workflow runs it."""
    document = yaml.safe_load(workflow)
    commands = []
    for stage in document["stages"]:
        line = next(s for s in document[stage]["script"] if s.startswith("lfsorch ci job"))
        commands.append(shlex.split(line.replace('"$LFS"', shlex.quote(str(lfs))))[1:])
    return commands


def _manifest(home: Path, key: str) -> dict[str, Any]:
    manifest = SnapshotStore(home / "snapshots").manifest(key)
    return {
        path: (entry.content(), entry.digest, entry.hardlink)
        for path, entry in manifest.entries.items()
    }


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def _one_file_tar() -> bytes:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as archive:
        member = tarfile.TarInfo("etc/made-elsewhere")
        member.size = 3
        archive.addfile(member, io.BytesIO(b"yes"))
    return data.getvalue()


def test_two_runners_hand_a_build_over_through_a_registry(
    runners: tuple[Registry, RunnerB],
    stage_file: WriteStage,
    tmp_path: Path,
    docker_client: docker.DockerClient,
) -> None:
    registry, runner_b = runners
    plan = _stage_files(stage_file)
    repo = f"127.0.0.1:{registry.port}/lfsorch"
    home_a, home_b, home_single = (tmp_path / name for name in ("a", "b", "single"))
    lfs_a, lfs_b, lfs_single = (tmp_path / f"lfs-{name}" for name in ("a", "b", "single"))
    for lfs in (lfs_a, lfs_b, lfs_single):
        lfs.mkdir()

    # Runner A: the lock (pushing the host image), the plan, and the first job.
    _ok(run_cli("lock", str(plan), "--push", f"{repo}/base", home=home_a))
    lock = (plan.parent / "lfsorch.lock").read_text()
    assert f'"pull": "{repo}/base@sha256:' in lock
    planned = run_cli(
        "ci", "plan", str(plan), "--max-minutes", "1", "--sbu-seconds", "20",
        "--format", "gitlab", home=home_a,
    )  # fmt: skip
    _ok(planned)
    workflow = planned.stdout
    assert "job 1: one/a .. two/b, about 0.7 min (of 0.8 min after the margin)" in planned.stderr
    first, second = _job_commands(workflow, lfs_a)
    assert first[first.index("--until") + 1] == "two/b" and "--after" not in first
    assert second[second.index("--after") + 1] == "two/b"
    built_a = _ok(run_cli(*first, home=home_a))
    assert "start  one/a" in built_a and "start  two/b" in built_a
    assert "two/c" not in built_a

    # Runner B: a fresh engine in a namespace of its own, whose own base image (made
    # elsewhere, as a second debootstrap would) is not A's.
    client_b = runner_b.start()
    assert client_b.images.list() == []
    client_b.api.import_image_from_data(
        _one_file_tar(), repository=BASE_IMAGE.split(":")[0], tag=BASE_IMAGE.split(":")[1]
    )
    base_a = docker_client.images.get(BASE_IMAGE).id
    assert client_b.images.get(BASE_IMAGE).id != base_a
    env_b = {"DOCKER_HOST": runner_b.host}
    second_b = [*second[: second.index("--lfs") + 1], str(lfs_b)]
    built_b = _ok(run_cli(*second_b, home=home_b, env=env_b))
    assert "start  two/c" in built_b and "start  two/d" in built_b
    assert "start  one/a" not in built_b and "start  two/b" not in built_b
    assert f"pushed {repo}/snapshot:" in built_b
    assert client_b.images.get(BASE_IMAGE).id == base_a  # pulled by the lock's digest
    assert os.readlink(lfs_b / "d") == "usr/c"
    assert (lfs_b / "usr" / "c").read_text() == "a\nb\n"

    # The same job again, on A: its checkpoint is in the registry, so nothing is built.
    again = _ok(run_cli(*second[:-1], str(tmp_path / "lfs-a"), home=home_a))
    assert "built already" in again and "start " not in again

    # One runner building the whole plan reaches the same key and the same tree.
    final_key = built_b.split(f"pushed {repo}/snapshot:", 1)[1].split()[0]
    single = run_cli(
        "run", str(plan), "--lfs", str(lfs_single), "-o", "checkpoint=package", home=home_single
    )  # fmt: skip
    _ok(single)
    assert SnapshotStore(home_single / "snapshots").has(final_key)
    assert _manifest(home_b, final_key) == _manifest(home_single, final_key)
    assert len(_manifest(home_b, final_key)) == 6  # ., a, d, usr, usr/b, usr/c


# SIGTERM is how a CI runner ends a job that overran its time limit.
def test_a_ci_job_stopped_by_its_runner_leaves_no_container(
    registry: Registry,
    stage_file: WriteStage,
    lfs_dir: Path,
    tmp_path: Path,
    docker_client: docker.DockerClient,
) -> None:
    plan = stage_file(
        "endless.yaml",
        f"stage: endless\nimage: {BASE_IMAGE}\npackages:\n"
        "  - name: ci-sleeper\n    script: sleep 300\n",
    )
    home = tmp_path / "home"
    repo = f"127.0.0.1:{registry.port}/lfsorch"
    _ok(run_cli("lock", str(plan), "--push", f"{repo}/base", home=home))
    job = start_cli(
        "ci", "job", str(plan), "--lfs", str(lfs_dir), "--registry", repo, "--until", "endless",
        home=home,
    )  # fmt: skip
    try:
        wait_for_container(docker_client, "ci-sleeper", owner=job.pid, timeout=120)
    finally:
        job.send_signal(signal.SIGTERM)  # also when waiting failed: no job left behind
        output, _ = job.communicate(timeout=60)

    assert job.returncode == 130, output
    assert "error: interrupted: running containers were stopped and removed" in output
    owned = {"label": [f"{engine.OWNER_PID}={job.pid}"]}
    assert docker_client.containers.list(all=True, filters=owned) == []
    [state] = [load_state(path) for path in Workspace(home).runs_dir.glob("*/state.json")]
    assert state is not None and state.outcome == "interrupted"
    assert f"pushed {repo}/snapshot:" not in output
