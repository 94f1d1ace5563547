"""The refusal list against a system directory reached by another path: a bind mount of `/`
or `/usr` has its own path, so comparing paths alone lets a build write into the host."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.checkpoints.treescan import PARTITION_MARKER
from orchestrator.workspace import Workspace
from tests.helpers import REPO

HINT = "  hint: pass a directory of its own, e.g. --lfs /mnt/lfs or a new empty directory\n"


def _in_private_mounts(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-ec", script],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=REPO,
        timeout=120,
        check=False,
    )


def _can_bind_mount(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    target = tmp_path / "probe"
    target.mkdir()
    probe = _in_private_mounts(f"mount --bind /usr {target}", {})
    return probe.returncode == 0


@pytest.mark.parametrize("system_dir", ["/", "/usr"])
def test_a_bind_mount_of_a_system_directory_is_refused(
    system_dir: str,
    workspace: Workspace,
    tmp_path: Path,
    stage_file: Callable[[str, str], Path],
) -> None:
    if not _can_bind_mount(tmp_path):
        pytest.skip("needs root and unshare for a private bind mount")
    stage = stage_file("s.yaml", "stage: s\npackages: [{name: a, script: 'true'}]\n")
    mounted = tmp_path / "lfs"
    mounted.mkdir()
    before = sorted(os.listdir(system_dir))
    command = [sys.executable, "-m", "orchestrator", "run", str(stage), "--lfs", str(mounted)]
    # Read-only, so that a regression fails on EROFS instead of writing into the host's root.
    result = _in_private_mounts(
        f"mount --bind {system_dir} {mounted}\n"
        f"mount -o remount,ro,bind {mounted}\n"
        + " ".join(command)
        + " -o checkpoint=none && exit 0 || exit $?",
        {},
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"error: cannot use {mounted} as the LFS partition: it is {system_dir} mounted at "
        "another path\n" + HINT
    )
    assert sorted(os.listdir(system_dir)) == before
    assert not os.path.lexists(os.path.join(system_dir, PARTITION_MARKER))
    assert not workspace.root.exists()
