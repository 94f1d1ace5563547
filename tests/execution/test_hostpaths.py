"""Whether the engine sees lfsorch's directories: the probe's parsing, the advice, detection."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.execution import hostpaths
from orchestrator.execution.hostpaths import SharedPath


def test_probe_output_gives_each_directory_its_device_and_inode() -> None:
    mounted = [(0, Path("/a")), (2, Path("/c"))]
    seen = hostpaths._parse("boot-1234\n0 2049 17\n2 66 5\n", mounted, {"/b"})
    assert seen.boot_id == "boot-1234"
    assert seen.identities == {"/a": (2049, 17), "/c": (66, 5), "/b": None}


def test_a_directory_the_probe_did_not_report_has_no_identity() -> None:
    seen = hostpaths._parse("boot\n", [(0, Path("/a"))], set())
    assert seen.identities == {"/a": None}


def test_host_source_follows_the_longest_bind_mount() -> None:
    mounts = [("/work/lfs", "/srv/lfs"), ("/work", "/home/ci/work")]
    assert hostpaths._host_source(Path("/work/lfs/usr"), mounts) == "/srv/lfs/usr"
    assert hostpaths._host_source(Path("/work/ws"), mounts) == "/home/ci/work/ws"
    assert hostpaths._host_source(Path("/workspace"), mounts) is None
    assert hostpaths._host_source(Path("/var/lib/lfsorch"), mounts) is None


def test_advice_names_the_host_path_and_the_option(tmp_path: Path) -> None:
    here = os.stat(tmp_path)
    lfs = SharedPath("the LFS partition", tmp_path, "--lfs")
    mounts = [(str(tmp_path), "/srv/lfs")]

    assert hostpaths._problem(lfs, tmp_path, (here.st_dev, here.st_ino), mounts) is None
    assert hostpaths._problem(lfs, tmp_path, None, mounts) == (
        f"the LFS partition {tmp_path}: here it is the host's /srv/lfs, mounted at another path",
        "-v /srv/lfs:/srv/lfs and --lfs /srv/lfs",
    )
    workspace = SharedPath("the workspace", tmp_path, "LFSORCH_HOME")
    assert hostpaths._problem(workspace, tmp_path, (1, 2), []) == (
        f"the workspace {tmp_path}: the engine has another directory at that path",
        f"-v {tmp_path}:{tmp_path} and -e LFSORCH_HOME={tmp_path}",
    )
    other = SharedPath("the sources view", tmp_path)
    assert hostpaths._problem(other, tmp_path, None, []) == (
        f"the sources view {tmp_path}: the engine has no directory at that path",
        f"-v {tmp_path}:{tmp_path}",
    )


def test_missing_directories_are_probed_at_their_nearest_ancestor_once(tmp_path: Path) -> None:
    (tmp_path / "ws").mkdir()
    paths = [
        SharedPath("the workspace", tmp_path / "ws", "LFSORCH_HOME"),
        SharedPath("the run directories", tmp_path / "ws" / "runs"),
        SharedPath("the LFS partition", tmp_path / "gone" / "lfs", "--lfs"),
    ]
    assert hostpaths._existing(paths) == [
        (paths[0], tmp_path / "ws"),
        (paths[2], tmp_path),
    ]


def test_a_remote_engine_never_counts_as_sharing_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:2375")
    assert hostpaths._socket_peer_pid() == 0
    assert hostpaths.engine_shares_mounts() is False


def test_a_socket_nobody_listens_on_counts_as_not_sharing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/nothing.sock")
    assert hostpaths.engine_shares_mounts() is False
