"""A build replaces what lfsorch keeps in the partition's marker directory: the id by a FIFO
(opening it would block every later command on the partition), the lock by a FIFO (cannot be
truncated) or by a hard link to a partition file (the pid would be written into that file)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.checkpoints.treescan import PARTITION_MARKER
from orchestrator.workspace import Workspace
from tests.helpers import BASE_IMAGE, run_cli

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leftovers")]

SABOTAGE = (
    f"cd /mnt/lfs/{PARTITION_MARKER} && rm -f id lock && mkfifo id"
    " && echo precious > /mnt/lfs/precious && ln /mnt/lfs/precious lock"
)


def test_a_build_that_swaps_the_marker_files_cannot_hang_or_break_later_commands(
    workspace: Workspace,
    lfs_dir: Path,
    stage_file: Callable[[str, str], Path],
    canary: Callable[[], dict[str, tuple[bytes | None, int]]],
) -> None:
    stage = stage_file(
        "s.yaml",
        f"""
        stage: s
        image: {BASE_IMAGE}
        checkpoint: none
        packages:
          - name: sabotage
            script: "{SABOTAGE}"
        """,
    )
    before = canary()
    first = run_cli("run", str(stage), "--lfs", str(lfs_dir), timeout=120)
    assert first.returncode == 0, first.stderr

    # Every later command on the partition returns, and the partition's file keeps its bytes.
    # A damaged id makes a new partition: its record starts anew.
    status = run_cli("status", "--lfs", str(lfs_dir), timeout=60)
    assert (status.returncode, status.stderr) == (
        1,
        f"error: no run recorded yet for the partition {lfs_dir}\n"
        "  hint: start one with `lfsorch run FILE --lfs DIR`\n",
    )
    harmless = stage_file(
        "t.yaml", f"stage: t\nimage: {BASE_IMAGE}\npackages: [{{name: a, script: 'true'}}]\n"
    )
    again = run_cli("run", str(harmless), "--lfs", str(lfs_dir), timeout=120)
    assert again.returncode == 0, again.stderr
    assert (lfs_dir / "precious").read_bytes() == b"precious\n"
    marker = lfs_dir / PARTITION_MARKER
    for name in ("id", "lock"):  # made anew, as regular files of their own
        assert stat.S_ISREG(os.lstat(marker / name).st_mode)
        assert os.lstat(marker / name).st_nlink == 1
    assert canary() == before
