"""Reading /proc/self/mountinfo (a sample file, no mounting)."""

from __future__ import annotations

from pathlib import Path

from orchestrator.checkpoints.mounts import mount_points, mounts_below

SAMPLE = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 8:3 / /mnt/lfs rw,relatime shared:20 - ext4 /dev/sda3 rw
41 40 0:5 / /mnt/lfs/dev rw,nosuid shared:2 - devtmpfs udev rw
42 41 0:25 / /mnt/lfs/dev/pts rw shared:3 - devpts devpts rw
43 40 0:26 / /mnt/lfs/my\\040build rw shared:4 - tmpfs tmpfs rw
44 22 0:27 / /mnt/lfs-other rw shared:5 - tmpfs tmpfs rw
"""


def test_mount_points_are_unescaped(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(SAMPLE)
    assert mount_points(info) == [
        "/", "/mnt/lfs", "/mnt/lfs/dev", "/mnt/lfs/dev/pts", "/mnt/lfs/my build", "/mnt/lfs-other"
    ]  # fmt: skip


def test_mounts_below_excludes_the_path_itself_and_its_namesakes(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(SAMPLE)
    assert mounts_below(Path("/mnt/lfs"), info) == [
        "/mnt/lfs/dev", "/mnt/lfs/dev/pts", "/mnt/lfs/my build"
    ]  # fmt: skip
    assert mounts_below(Path("/mnt/lfs/usr"), info) == []


def test_unreadable_mountinfo_means_no_mounts(tmp_path: Path) -> None:
    assert mount_points(tmp_path / "missing") == []
