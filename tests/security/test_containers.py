"""Build containers get the least privilege LFS needs: an explicit capability set,
no-new-privileges, no device nodes unless the stage asks, a bounded disk of their own."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import docker
import pytest

from orchestrator import api
from orchestrator.checkpoints.treescan import PARTITION_MARKER
from orchestrator.errors import LfsorchError
from orchestrator.execution import engine
from orchestrator.execution.environment import BASE_CAPABILITIES, OPTIONAL_CAPABILITIES, BuildJob
from orchestrator.spec.models import Stage
from orchestrator.workspace import Workspace
from tests.helpers import REPO, run_cli, start_cli

# Bit numbers from linux/capability.h.
CAPABILITY_BITS = {
    "CHOWN": 0,
    "DAC_OVERRIDE": 1,
    "FOWNER": 3,
    "FSETID": 4,
    "KILL": 5,
    "SETGID": 6,
    "SETUID": 7,
    "SYS_CHROOT": 18,
    "MKNOD": 27,
}
# Prints the kernel's view of the script's privileges, then tries a block device of the
# host's first disk in the partition.
PROBE = """\
grep -E '^(CapEff|CapBnd|NoNewPrivs):' /proc/self/status
mknod $LFS/sda b 8 0 2>/dev/null && echo "block node: made" || echo "block node: refused"
mknod $LFS/null c 1 3 2>/dev/null && echo "char node: made" || echo "char node: refused"
"""


def _mask(names: list[str] | tuple[str, ...]) -> int:
    return sum(1 << CAPABILITY_BITS[name] for name in names)


def _job(tmp_path: Path, capabilities: tuple[str, ...] = ()) -> BuildJob:
    return BuildJob(
        run_id="r",
        stage="s",
        package="p",
        attempt=1,
        image="i",
        script="true",
        environment={},
        lfs_dir=tmp_path,
        log_path=tmp_path / "log",
        timeout_s=60,
        capabilities=capabilities,
    )


def _stage(stage_file, name: str, header: str, script: str):
    body = "".join(f"      {row}\n" for row in script.splitlines())
    return stage_file(
        f"{name}.yaml",
        f"stage: {name}\nenvironment: {{LFS: /mnt/lfs}}\n{header}"
        f"packages:\n  - name: probe\n    script: |\n{body}",
    )


def _probe_output(workspace: Workspace, stage: str) -> dict[str, str]:
    (log,) = workspace.root.glob(f"runs/*/logs/{stage}/probe.log")
    return dict(re.findall(r"^([A-Za-z ]+):\s*(.*)$", log.read_text(), flags=re.M))


class TestCapabilitySet:
    def test_the_base_set_is_what_chapters_4_to_6_need(self, tmp_path: Path) -> None:
        assert _job(tmp_path).capability_set() == ["CHOWN", "DAC_OVERRIDE", "SETGID", "SETUID"]

    def test_a_declared_capability_is_added(self, tmp_path: Path) -> None:
        job = _job(tmp_path, ("mknod",))
        assert job.capability_set() == ["CHOWN", "DAC_OVERRIDE", "MKNOD", "SETGID", "SETUID"]

    def test_a_capability_outside_the_allowlist_is_an_error(self, tmp_path: Path) -> None:
        with pytest.raises(LfsorchError) as caught:
            _job(tmp_path, ("sys_admin",)).capability_set()
        assert caught.value.message == "capabilities not allowed in builds: sys_admin"

    def test_the_stage_schema_allows_exactly_the_optional_capabilities(self) -> None:
        schema = Stage.model_json_schema()
        items = schema["properties"]["capabilities"]["items"]
        assert tuple(sorted(items["enum"])) == OPTIONAL_CAPABILITIES


def test_validate_refuses_a_capability_outside_the_allowlist(stage_file, tmp_path: Path) -> None:
    path = stage_file(
        "bad.yaml",
        'stage: bad\ncapabilities: [mknod, sys_admin]\npackages:\n  - {name: a, script: "true"}\n',
    )
    before = sorted(tmp_path.rglob("*"))
    result = run_cli("validate", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        f"{path}:2: capabilities[1]: Input should be "
        "'fowner', 'fsetid', 'kill', 'mknod', 'setfcap' or 'sys_chroot'"
    )
    assert sorted(tmp_path.rglob("*")) == before


def _find_container(client: docker.DockerClient, cli: subprocess.Popen[str], stage: str):
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline and cli.poll() is None:
        found = client.containers.list(
            filters={"label": [f"{engine.STAGE}={stage}", f"{engine.OWNER_PID}={cli.pid}"]}
        )
        if found:
            return found[0]
        time.sleep(0.2)
    output = cli.stdout.read() if cli.poll() is not None and cli.stdout else ""
    raise AssertionError(f"no running container of stage {stage}: {output}")


@pytest.mark.docker
@pytest.mark.usefixtures("no_leftovers")
def test_a_root_build_has_exactly_the_base_set_and_no_new_privileges(
    workspace: Workspace, lfs_dir: Path, stage_file, docker_client: docker.DockerClient
) -> None:
    """Read back while it runs (engine's view) and from inside (kernel's view); the block
    device of the host's disk is refused and nothing appears in the partition."""
    wait = "for i in $(seq 300); do [ -e $LFS/release ] && break; sleep 0.1; done\nrm $LFS/release"
    path = _stage(stage_file, "capsprobe", "user: root\n", PROBE + wait)
    cli = start_cli(
        "run",
        str(path),
        "--lfs",
        str(lfs_dir),
        env={"LFSORCH_HOME": str(workspace.root), "LFSORCH_CHECKPOINT": "none"},
    )
    try:
        host_config = _find_container(docker_client, cli, "capsprobe").attrs["HostConfig"]
    finally:
        (lfs_dir / "release").touch()
        output, _ = cli.communicate(timeout=120)
    assert cli.returncode == 0, output
    assert host_config["CapDrop"] == ["ALL"]
    assert sorted(host_config["CapAdd"]) == sorted(BASE_CAPABILITIES)
    assert host_config["SecurityOpt"] == ["no-new-privileges"]
    assert host_config["LogConfig"] == {
        "Type": "json-file",
        "Config": {"max-size": "10m", "max-file": "2"},
    }
    seen = _probe_output(workspace, "capsprobe")
    assert int(seen["CapEff"], 16) == _mask(BASE_CAPABILITIES)
    assert int(seen["CapBnd"], 16) == _mask(BASE_CAPABILITIES)
    assert seen["NoNewPrivs"] == "1"
    assert (seen["block node"], seen["char node"]) == ("refused", "refused")
    assert sorted(p.name for p in lfs_dir.iterdir() if p.name != PARTITION_MARKER) == []


@pytest.mark.docker
@pytest.mark.usefixtures("no_leftovers")
def test_mknod_only_where_the_stage_declares_it(
    workspace: Workspace, lfs_dir: Path, stage_file
) -> None:
    path = _stage(stage_file, "devices", "user: root\ncapabilities: [mknod]\n", PROBE)
    state = api.run([path], lfs_dir, overrides=["checkpoint=none"])
    assert state.outcome == "succeeded"
    seen = _probe_output(workspace, "devices")
    assert int(seen["CapBnd"], 16) == _mask([*BASE_CAPABILITIES, "MKNOD"])
    assert seen["char node"] == "made"
    assert (lfs_dir / "null").is_char_device()


@pytest.mark.docker
@pytest.mark.usefixtures("no_leftovers")
def test_the_stage_user_runs_with_no_capabilities(
    workspace: Workspace, lfs_dir: Path, stage_file
) -> None:
    path = _stage(stage_file, "unprivileged", "user: lfs\n", PROBE + "id -un | sed 's/^/user: /'")
    state = api.run([path], lfs_dir, overrides=["checkpoint=none"])
    assert state.outcome == "succeeded"
    seen = _probe_output(workspace, "unprivileged")
    assert (seen["user"], int(seen["CapEff"], 16), seen["NoNewPrivs"]) == ("lfs", 0, "1")
    assert int(seen["CapBnd"], 16) == _mask(BASE_CAPABILITIES)
    assert (seen["block node"], seen["char node"]) == ("refused", "refused")


@pytest.mark.docker
@pytest.mark.usefixtures("no_leftovers")
def test_chapter_4_layout_then_lfs_builds_on_a_partition_root_does_not_own(
    workspace: Workspace, lfs_dir: Path, stage_file
) -> None:
    """ch4 as root (mkdir, chown to lfs and to a bare uid) on a partition owned by uid 1000,
    as after `mkdir` by a user; then a chapter-5-like package as lfs writes into it."""
    os.chown(lfs_dir, 1000, 1000)
    ch4 = REPO / "stages" / "ch4.yaml"
    tools = stage_file(
        "ch5like.yaml",
        """\
        stage: ch5like
        requires: [ch4]
        user: lfs
        environment: {LFS: /mnt/lfs}
        packages:
          - name: tools
            script: |
              mkdir -p $LFS/tools/bin && printf 'echo ok\\n' > $LFS/tools/bin/probe
              chmod 755 $LFS/tools/bin/probe
        """,
    )
    (tools.parent / "ch4.yaml").write_text(ch4.read_text())
    extra = stage_file(
        "bareuid.yaml",
        "stage: bareuid\nuser: root\npackages:\n  - name: own\n    script: |\n"
        "      mkdir -p /mnt/lfs/srv/x && chown -R 4321:4321 /mnt/lfs/srv\n",
    )
    state = api.run([tools, extra], lfs_dir, overrides=["checkpoint=none"])
    assert state.outcome == "succeeded", [(p.name, p.status) for p in state.packages]
    probe = lfs_dir / "tools" / "bin" / "probe"
    assert probe.read_text() == "echo ok\n"
    assert (lfs_dir / "tools").stat().st_uid == probe.stat().st_uid != 0
    assert (lfs_dir / "srv" / "x").stat().st_uid == 4321


@pytest.mark.docker
@pytest.mark.usefixtures("no_leftovers")
def test_the_demo_stage_builds_with_the_base_set(workspace: Workspace, lfs_dir: Path) -> None:
    state = api.run([REPO / "stages" / "demo.yaml"], lfs_dir, overrides=["checkpoint=none"])
    assert state.outcome == "succeeded"
    assert (lfs_dir / "usr" / "bin" / "hello").is_file()


@pytest.mark.docker
@pytest.mark.usefixtures("no_leftovers")
def test_a_build_filling_more_than_build_space_is_killed(
    workspace: Workspace, lfs_dir: Path, stage_file
) -> None:
    path = stage_file(
        "filler.yaml",
        """\
        stage: filler
        packages:
          - name: fill
            script: |
              head -c 64M /dev/zero > /build/fill
              sleep 60
              echo "still running"
        """,
    )
    started = time.monotonic()
    state = api.run([path], lfs_dir, overrides=["checkpoint=none", "build_space=16m"])
    (package,) = state.packages
    assert package.status == "failed"
    assert time.monotonic() - started < 45
    error = package.attempts[-1].error or ""
    assert re.fullmatch(
        r"wrote 0\.06 GiB outside its mounts \(/build and the container's own files\), more "
        r"than build_space \(0\.02 GiB\); container killed",
        error,
    ), error
    assert b"still running" not in Path(package.log or "").read_bytes()
