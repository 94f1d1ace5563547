"""Chroot stages on the real engine, with a tiny usr-merged partition made from Debian's
busybox-static: the container's root is the partition, its /proc and /dev/pts are its own,
its privileges are exactly the configured ones (read with `docker inspect` while it runs),
nothing outside the partition changes and no mount is left on the host. Partitions that are
not ready, or hostile, are refused before any container exists."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import docker
import docker.models.containers
import pytest

from orchestrator import api
from orchestrator.build.state import RunState
from orchestrator.errors import LfsorchError
from orchestrator.execution import chrootroot, engine
from orchestrator.execution.chroot import CHROOT_BUILD_PREFIX, StartGate
from orchestrator.monitor.events import Event
from orchestrator.workspace import Workspace
from tests.helpers import BASE_IMAGE, run_build, start_cli, started, tree_state, wait_for_container

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leftovers")]

WriteStage = Callable[[str, str], Path]
BUSYBOX = Path("/bin/busybox")
# The test partition's bash is busybox's ash behind a `#!` wrapper: busybox has no `bash`
# applet, and the entry script is plain POSIX shell, which ash runs.
BASH_WRAPPER = '#!/usr/bin/sh\nexec /usr/bin/busybox sh "$@"\n'
HOSTS = "127.0.0.1 localhost partition-hosts\n"
# CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID: bits 0, 1, 3, 4, 5, 6, 7.
EXPECTED_CAPS = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID"]
EXPECTED_CAPEFF = "CapEff:\t00000000000000fb"


@pytest.fixture
def busybox_lfs(lfs_dir: Path) -> Path:
    """A usr-merged partition as the book's chapter 4 lays it out, its programs busybox's."""
    if not BUSYBOX.is_file():
        if os.environ.get("CI"):
            pytest.fail("busybox-static is not installed (scripts/setup-host installs it)")
        pytest.skip("busybox-static is not installed (scripts/setup-host installs it)")
    for name in ("usr/bin", "usr/lib", "usr/sbin", "lib64", "etc", "root", "var", "tmp"):
        (lfs_dir / name).mkdir(parents=True)
    os.chmod(lfs_dir / "tmp", 0o1777)
    for name in ("bin", "lib", "sbin"):
        os.symlink(f"usr/{name}", lfs_dir / name)
    shutil.copy2(BUSYBOX, lfs_dir / "usr/bin/busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        if applet != "bash" and not (lfs_dir / "usr/bin" / applet).exists():
            os.symlink("busybox", lfs_dir / "usr/bin" / applet)
    (lfs_dir / "usr/bin/bash").write_text(BASH_WRAPPER)
    os.chmod(lfs_dir / "usr/bin/bash", 0o755)
    (lfs_dir / "etc/hosts").write_text(HOSTS)
    (lfs_dir / "etc/hostname").write_text("lfs\n")
    (lfs_dir / "etc/resolv.conf").write_text("# none\n")
    return lfs_dir


def _mounts_under(path: Path) -> list[str]:
    """Lines of the host's mount table that name `path` or anything below it."""
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line for line in lines if str(path) in line]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wait_for(path: Path, outcome: list[RunState | BaseException], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if outcome and isinstance(outcome[0], BaseException):
            raise outcome[0]
        assert not outcome, f"the run ended before {path} appeared: {outcome}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def _running(client: docker.DockerClient, package: str) -> dict[str, object]:
    labels = [f"{engine.PACKAGE}={package}", f"{engine.OWNER_PID}={os.getpid()}"]
    containers = client.containers.list(filters={"label": labels})
    assert len(containers) == 1
    return dict(containers[0].attrs)


PROBE = """
pwd > /tmp/workdir
mkdir -p /usr/share/probe && cd /usr/share/probe
mv /tmp/workdir workdir
tr '\\0' ' ' < /proc/1/cmdline > pid1
grep ' /dev/pts ' /proc/mounts > devpts
cat /etc/hosts > hosts
grep CapEff /proc/self/status > capeff
echo "$HOME|$PATH|$TERM|$MAKEFLAGS|$LFSORCH_ATTEMPT" > environment
touch /tmp/waiting
while [ ! -e /tmp/go ]; do sleep 0.1; done
"""


def _probe_stage(stage_file: WriteStage) -> Path:
    return stage_file(
        "inchroot.yaml",
        f"""
        stage: inchroot
        image: {BASE_IMAGE}
        chroot: true
        capabilities: [fowner, fsetid, kill]
        timeout: 120s
        packages:
          - name: probe
            script: {json.dumps(PROBE)}
        """,
    )


def _run_in_thread(
    files: list[Path], lfs: Path, workspace: Workspace
) -> tuple[threading.Thread, list[RunState | BaseException]]:
    outcome: list[RunState | BaseException] = []

    def build() -> None:
        try:
            outcome.append(run_build(files, lfs, workspace)[0])
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    thread = threading.Thread(target=build)
    thread.start()
    return thread, outcome


def test_a_chroot_package_sees_the_partition_as_root_with_its_own_proc_and_pts(
    workspace: Workspace,
    busybox_lfs: Path,
    stage_file: WriteStage,
    docker_client: docker.DockerClient,
    canary: Callable[[], object],
    tmp_path: Path,
) -> None:
    path = _probe_stage(stage_file)
    before = (canary(), _digest(Path("/etc/hosts")), _mounts_under(tmp_path))
    thread, outcome = _run_in_thread([path], busybox_lfs, workspace)
    _wait_for(busybox_lfs / "tmp/waiting", outcome)
    attrs = _running(docker_client, "probe")
    mounts_during = _mounts_under(tmp_path)
    private = list(workspace.runs_dir.glob(f"*/{CHROOT_BUILD_PREFIX}*"))
    modes = [stat.S_IMODE(os.lstat(p).st_mode) for p in (*private, *(p / "build" for p in private))]
    (busybox_lfs / "tmp/go").touch()
    thread.join(timeout=120)
    assert isinstance(outcome[0], RunState) and outcome[0].outcome == "succeeded"

    host = attrs["HostConfig"]
    assert isinstance(host, dict)
    assert host["Privileged"] is False
    assert host["CapDrop"] == ["ALL"] and sorted(host["CapAdd"]) == EXPECTED_CAPS
    assert host["SecurityOpt"] == ["no-new-privileges"] and host["NetworkMode"] == "none"
    assert host.get("Init") in (None, False)
    sources = {m["Source"] for m in attrs["Mounts"]}  # type: ignore[attr-defined]
    assert not sources & {"/proc", "/dev", "/sys", "/", "/etc"}
    assert mounts_during == before[2] == []  # the binds are the container's, never the host's
    assert modes == [0o700, 0o755]  # /build is below a directory the host's users cannot enter

    probe = busybox_lfs / "usr/share/probe"
    assert "lfsorch_counters" in (probe / "pid1").read_text()  # PID 1 is the entry script
    devpts = (probe / "devpts").read_text().split()
    assert devpts[:3] == ["devpts", "/dev/pts", "devpts"]
    assert {"gid=5", "mode=620"} <= set(devpts[3].split(","))
    assert (probe / "hosts").read_text() == HOSTS
    assert (probe / "capeff").read_text().strip() == EXPECTED_CAPEFF
    home, path_, term, makeflags, attempt = (probe / "environment").read_text().strip().split("|")
    assert (home, path_, term, attempt) == ("/root", "/usr/bin:/usr/sbin", "dumb", "1")
    assert makeflags.startswith("-j")
    assert (probe / "workdir").read_text() == "/build\n"

    assert (busybox_lfs / "etc/hostname").read_text() == "lfs\n"
    assert (busybox_lfs / "etc/resolv.conf").read_text() == "# none\n"
    assert sorted(os.listdir(busybox_lfs)) == sorted(
        [".lfsorch-partition", "bin", "etc", "lib", "lib64", "root", "sbin", "tmp", "usr", "var"]
    )
    after = (canary(), _digest(Path("/etc/hosts")), _mounts_under(tmp_path))
    assert after == before
    run_dir = workspace.run_dir(outcome[0].run_id)
    assert [p for p in run_dir.iterdir() if p.name.startswith(CHROOT_BUILD_PREFIX)] == []


def _refused(
    workspace: Workspace, lfs: Path, path: Path, canary: Callable[[], object]
) -> LfsorchError:
    before = ({k: v for k, v in tree_state(lfs).items() if k != "."}, canary())
    with pytest.raises(LfsorchError) as raised:
        run_build([path], lfs, workspace)
    after = ({k: v for k, v in tree_state(lfs).items() if k != "."}, canary())
    assert after == before
    return raised.value


def _one_package(stage_file: WriteStage, script: str = "touch /usr/touched") -> Path:
    return stage_file(
        "inchroot.yaml",
        f"""
        stage: inchroot
        image: {BASE_IMAGE}
        chroot: true
        packages:
          - {{name: one, script: "{script}"}}
        """,
    )


def test_a_missing_loader_is_named_before_the_engine_says_no_such_file(
    workspace: Workspace, busybox_lfs: Path, stage_file: WriteStage, canary: Callable[[], object]
) -> None:
    # A dynamically linked bash (the host's) in a partition without lib64's loader.
    (busybox_lfs / "usr/bin/bash").unlink()
    shutil.copy2("/usr/bin/bash", busybox_lfs / "usr/bin/bash")
    error = _refused(workspace, busybox_lfs, _one_package(stage_file), canary)
    assert error.message == (
        f"the partition {busybox_lfs} has no lib64/ld-linux-x86-64.so.2, the interpreter "
        "/usr/bin/bash needs: the container would fail with `exec /usr/bin/bash: no such file "
        "or directory`"
    )
    assert error.hint == (
        "install glibc into the partition (the book's chapter 5) and keep lib64 a real "
        "directory of the partition"
    )


def test_missing_etc_hosts_is_refused_and_nothing_is_written_in_etc(
    workspace: Workspace, busybox_lfs: Path, stage_file: WriteStage, canary: Callable[[], object]
) -> None:
    (busybox_lfs / "etc/hosts").unlink()
    error = _refused(workspace, busybox_lfs, _one_package(stage_file), canary)
    assert error.message == (
        f"the partition {busybox_lfs} has no etc/hosts (a regular file, not a link): a chroot "
        "package sees the partition's own, and the engine would otherwise leave empty files "
        "of its own there"
    )
    assert not (busybox_lfs / "etc/hosts").exists()


def test_a_top_level_symlink_out_of_the_partition_is_refused(
    workspace: Workspace, busybox_lfs: Path, stage_file: WriteStage, canary: Callable[[], object]
) -> None:
    os.symlink("/etc", busybox_lfs / "hostetc")
    error = _refused(workspace, busybox_lfs, _one_package(stage_file), canary)
    assert error.message == (
        f"the partition {busybox_lfs} has a top-level symlink hostetc -> /etc, which points "
        "outside the partition: the engine would bind the host's directory"
    )


def test_a_top_level_fifo_is_left_alone_and_named_in_the_log(
    workspace: Workspace, busybox_lfs: Path, stage_file: WriteStage
) -> None:
    os.mkfifo(busybox_lfs / "pipe")
    # The start gate is gone from /build before the script's first command.
    script = "test ! -e /pipe && test ! -e /build/.lfsorch-start && touch /usr/touched"
    state, _ = run_build([_one_package(stage_file, script)], busybox_lfs, workspace)
    assert state.outcome == "succeeded"
    assert (busybox_lfs / "usr/touched").is_file()
    assert stat.S_ISFIFO(os.lstat(busybox_lfs / "pipe").st_mode)
    log = Path(str(state.packages[0].log)).read_text()
    assert "lfsorch: not visible in the chroot (not directories): pipe\n" in log


def test_a_run_killed_in_a_chroot_package_resumes_at_that_package(
    workspace: Workspace,
    busybox_lfs: Path,
    stage_file: WriteStage,
    docker_client: docker.DockerClient,
) -> None:
    path = stage_file(
        "inchroot.yaml",
        f"""
        stage: inchroot
        image: {BASE_IMAGE}
        chroot: true
        checkpoint: package
        packages:
          - {{name: first, script: "echo built >> /usr/first"}}
          - name: second
            depends: [first]
            script: |
              [ "$LFSORCH_ATTEMPT" -gt 1 ] || sleep 300
              echo "$LFSORCH_ATTEMPT" > /usr/second
        """,
    )
    process = start_cli("run", str(path), "--lfs", str(busybox_lfs), home=workspace.root)
    wait_for_container(docker_client, "second", owner=process.pid, timeout=90)
    process.kill()
    process.communicate(timeout=30)
    left = list(workspace.runs_dir.glob(f"*/{CHROOT_BUILD_PREFIX}*"))
    assert len(left) == 1  # the killed attempt's /build

    state, recorded = run_build([path], busybox_lfs, workspace)
    assert state.outcome == "succeeded"
    assert started(recorded) == ["inchroot/second"]
    assert (busybox_lfs / "usr/first").read_text() == "built\n"
    assert (busybox_lfs / "usr/second").read_text() == "2\n"
    assert list(workspace.runs_dir.glob(f"*/{CHROOT_BUILD_PREFIX}*")) == []
    cleanup = [e for e in recorded if e.name == "engine.cleanup"]
    assert str(left[0]) in _removed(cleanup)


def _removed(cleanup: list[Event]) -> list[str]:
    return [name for event in cleanup for name in event.data["removed"]]


def test_the_first_tarball_is_unpacked_by_the_partition_s_tar_and_entered(
    workspace: Workspace, busybox_lfs: Path, stage_file: WriteStage, tmp_path: Path
) -> None:
    # Plain tar: Debian's busybox tar does not detect compression as the partition's GNU tar
    # (chapter 6) does; the entry script's `tar -xf` is the same for both.
    tarball = tmp_path / "hello-1.0.tar"
    tree = tmp_path / "tree"
    (tree / "hello-1.0").mkdir(parents=True)
    (tree / "hello-1.0/greeting").write_text("hello from the tarball\n")
    (tree / "extra.txt").write_text("second source\n")
    subprocess.run(["tar", "-cf", tarball, "-C", tree, "hello-1.0"], check=True)
    extra = tree / "extra.txt"
    sources = [
        {"file": "hello-1.0.tar", "url": "http://127.0.0.1:9/hello-1.0.tar"},
        {"file": "extra.txt", "url": "http://127.0.0.1:9/extra.txt"},
    ]
    for source, local in zip(sources, (tarball, extra), strict=True):
        source["sha256"] = _digest(local)
    path = stage_file(
        "inchroot.yaml",
        f"""
        stage: inchroot
        image: {BASE_IMAGE}
        chroot: true
        packages:
          - name: hello
            sources: {json.dumps(sources)}
            script: |
              pwd > /usr/where
              cat greeting ../extra.txt >> /usr/where
              ! touch /sources/new 2>/dev/null
        """,
    )
    added = api.add_sources([tarball, extra], [path], workspace=workspace)
    assert not added.refused
    state, _ = run_build([path], busybox_lfs, workspace)
    assert state.outcome == "succeeded", Path(str(state.packages[0].log)).read_text()
    assert (busybox_lfs / "usr/where").read_text() == (
        "/build/hello-1.0\nhello from the tarball\nsecond source\n"
    )


def test_a_failed_chroot_attempt_is_retried_from_a_clean_build_directory(
    workspace: Workspace, busybox_lfs: Path, stage_file: WriteStage
) -> None:
    path = stage_file(
        "inchroot.yaml",
        f"""
        stage: inchroot
        image: {BASE_IMAGE}
        chroot: true
        retries: 1
        recovery: {{backoff: 0.1}}
        packages:
          - name: flaky
            script: |
              ls -A /build >> /usr/seen
              touch /build/left-by-$LFSORCH_ATTEMPT
              [ "$LFSORCH_ATTEMPT" -gt 1 ]
        """,
    )
    state, _ = run_build([path], busybox_lfs, workspace)
    assert state.outcome == "succeeded"
    assert [a.exit_code for a in state.packages[0].attempts] == [1, 0]
    assert (busybox_lfs / "usr/seen").read_text() == ""  # each attempt's /build was empty


def test_a_chroot_false_package_prepares_the_top_level_for_the_chroot_packages(
    workspace: Workspace, busybox_lfs: Path, stage_file: WriteStage
) -> None:
    # The book's 7.5-7.6 as the stage files write them: outside, then inside.
    for name in ("hosts", "hostname", "resolv.conf"):
        (busybox_lfs / "etc" / name).unlink()
    path = stage_file(
        "inchroot.yaml",
        f"""
        stage: inchroot
        image: {BASE_IMAGE}
        chroot: true
        packages:
          - name: essentials
            chroot: false
            script: |
              mkdir -p /mnt/lfs/home /mnt/lfs/mnt
              echo "127.0.0.1 localhost lfs" > /mnt/lfs/etc/hosts
              echo lfs > /mnt/lfs/etc/hostname
              : > /mnt/lfs/etc/resolv.conf
          - name: inside
            depends: [essentials]
            script: |
              test -d /home && test -d /mnt
              cat /etc/hosts > /home/seen
        """,
    )
    state, _ = run_build([path], busybox_lfs, workspace)
    assert state.outcome == "succeeded"
    assert (busybox_lfs / "home/seen").read_text() == "127.0.0.1 localhost lfs\n"


def test_build_space_counts_what_a_chroot_package_writes_in_build(
    workspace: Workspace, busybox_lfs: Path, stage_file: WriteStage
) -> None:
    path = _one_package(stage_file, "head -c 3000000 /dev/zero > /build/big; sleep 60")
    state, _ = run_build([path], busybox_lfs, workspace, overrides=["build_space=1m"])
    assert state.outcome == "failed"
    error = state.packages[0].attempts[-1].error or ""
    assert "outside its mounts" in error and "more than build_space (0.00 GiB)" in error


def test_top_level_names_with_mount_syntax_characters_are_bound_as_they_are(
    workspace: Workspace, busybox_lfs: Path, stage_file: WriteStage
) -> None:
    # Commas, colons, `=` and spaces are field separators of the engine's --mount and -v
    # syntax; the API's mounts take them as plain names.
    names = ["a,b=c", "d:e", "f g"]
    for name in names:
        (busybox_lfs / name).mkdir()
        (busybox_lfs / name / "seen").write_text(name)
    script = " && ".join(f"test -f '/{name}/seen'" for name in names) + " && touch /usr/touched"
    state, _ = run_build([_one_package(stage_file, script)], busybox_lfs, workspace)
    assert state.outcome == "succeeded"
    assert (busybox_lfs / "usr/touched").is_file()


def test_a_setuid_program_in_the_partition_gains_no_privilege(
    workspace: Workspace, busybox_lfs: Path, stage_file: WriteStage
) -> None:
    # The partition's setuid programs are the build's own: no-new-privileges holds for every
    # process of the chroot, so the bit is ignored.
    os.chmod(busybox_lfs / "usr/bin/busybox", 0o4755)
    script = "grep NoNewPrivs /proc/self/status > /usr/nnp"
    state, _ = run_build([_one_package(stage_file, script)], busybox_lfs, workspace)
    assert state.outcome == "succeeded", Path(str(state.packages[0].log)).read_text()
    assert (busybox_lfs / "usr/nnp").read_text() == "NoNewPrivs:\t1\n"


def test_a_new_top_level_entry_fails_the_package_instead_of_vanishing(
    workspace: Workspace, busybox_lfs: Path, stage_file: WriteStage
) -> None:
    # Outside the bound directories the root is the container's own layer: a write there
    # would succeed and be lost with the container, so it must fail loudly.
    script = "mkdir /opt && touch /opt/kept"
    state, _ = run_build([_one_package(stage_file, script)], busybox_lfs, workspace)
    assert state.outcome == "failed"
    assert not (busybox_lfs / "opt").exists()
    log = Path(str(state.packages[0].log)).read_text()
    assert "Read-only file system" in log


@pytest.mark.parametrize("swapped", ["var", "etc/hosts"])
def test_a_bind_source_swapped_for_a_host_link_after_the_checks_stops_the_build_unrun(
    workspace: Workspace,
    busybox_lfs: Path,
    stage_file: WriteStage,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    swapped: str,
) -> None:
    """The race the checks alone leave open: between reading the partition and the engine's
    bind, a top-level directory or an etc file becomes a symlink to a host path. The
    container is stopped at its gate, before the build's first command."""
    host_dir, host_before = _host_side(tmp_path)
    target = host_dir if swapped == "var" else host_dir / "hosts"
    recorded = chrootroot.bound_identities

    def record_then_swap(lfs: Path, top: chrootroot.ChrootTop) -> dict[str, chrootroot.Identity]:
        identities = recorded(lfs, top)
        victim = lfs / swapped
        if victim.is_dir():
            shutil.rmtree(victim)
        else:
            victim.unlink()
        os.symlink(target, victim)
        return identities

    monkeypatch.setattr(chrootroot, "bound_identities", record_then_swap)
    error = _swap_refused(stage_file, busybox_lfs, workspace)
    assert error.message == (
        f"the partition {busybox_lfs} changed while a chroot container was being made: "
        f"{swapped} is no longer what was checked (now a symlink to {target}); nothing ran "
        "in the container"
    )
    assert tree_state(host_dir) == host_before
    assert not (busybox_lfs / "usr/touched").exists()
    assert _mounts_under(busybox_lfs) == []


def test_an_etc_file_swapped_and_put_back_around_the_bind_is_still_caught(
    workspace: Workspace,
    busybox_lfs: Path,
    stage_file: WriteStage,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """etc/hosts moved aside and replaced by a link to a host file while the engine binds,
    then put back: the checked file is at /etc/hosts again, but the engine bound the host's
    file where the link pointed inside the container. The mount table gives it away."""
    host_dir, host_before = _host_side(tmp_path)
    hosts, aside = busybox_lfs / "etc/hosts", busybox_lfs / "etc/hosts.aside"
    recorded, gate_open = chrootroot.bound_identities, StartGate.open

    def record_then_swap(lfs: Path, top: chrootroot.ChrootTop) -> dict[str, chrootroot.Identity]:
        identities = recorded(lfs, top)
        os.rename(hosts, aside)
        os.symlink(host_dir / "hosts", hosts)
        return identities

    def put_back_then_open(gate: StartGate, container: docker.models.containers.Container) -> None:
        os.rename(aside, hosts)
        gate_open(gate, container)

    monkeypatch.setattr(chrootroot, "bound_identities", record_then_swap)
    monkeypatch.setattr(StartGate, "open", put_back_then_open)
    error = _swap_refused(stage_file, busybox_lfs, workspace)
    assert error.message == (
        f"the partition {busybox_lfs} changed while a chroot container was being made: the "
        f"engine mounted something at {host_dir / 'hosts'}, which lfsorch did not ask for; "
        "nothing ran in the container"
    )
    assert tree_state(host_dir) == host_before
    assert hosts.read_text() == HOSTS
    assert _mounts_under(busybox_lfs) == []


def _host_side(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    host_dir = tmp_path / "host-side"
    host_dir.mkdir()
    (host_dir / "hosts").write_text("host's own\n")
    return host_dir, tree_state(host_dir)


def _swap_refused(stage_file: WriteStage, lfs: Path, workspace: Workspace) -> LfsorchError:
    script = "echo escaped > /var/escaped; echo escaped > /etc/hosts; touch /usr/touched"
    with pytest.raises(LfsorchError) as raised:
        run_build([_one_package(stage_file, script)], lfs, workspace)
    return raised.value
