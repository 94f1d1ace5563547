"""What a partition must be before it can be a container's root: read from the host, no
engine needed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from orchestrator.errors import LfsorchError
from orchestrator.execution import chrootroot
from orchestrator.execution.chroot import ROOT_IMAGE, chroot_command, root_image_tar
from orchestrator.execution.environment import BuildJob
from orchestrator.spec.stagefile import StageFileError, parse_stage_text


def _usr_merged(root: Path) -> Path:
    for name in ("usr/bin", "usr/lib", "lib64", "etc"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for name in ("bin", "lib", "sbin"):
        os.symlink(f"usr/{name}", root / name)
    return root


def test_the_top_level_directories_are_bound_and_lfsorch_s_own_are_not(tmp_path: Path) -> None:
    root = _usr_merged(tmp_path)
    for name in ("dev", "proc", "sys", "run", "sources", ".lfsorch-partition", "tools"):
        (root / name).mkdir()
    (root / "notes.txt").write_text("x")
    os.mkfifo(root / "pipe")
    top = chrootroot.survey_top(root)
    assert top.directories == ("etc", "lib64", "tools", "usr")
    assert top.skipped == ("notes.txt", "pipe")


OUTSIDE = ", which points outside the partition: the engine would bind the host's directory"
ONLY_USR_MERGE = ": only bin, lib and sbin may be links (to usr/...) in a chroot stage's root"


@pytest.mark.parametrize(
    ("name", "target", "reason"),
    [
        ("etc", "/etc", OUTSIDE),
        ("up", "../../x", OUTSIDE),
        ("lib64", "usr/lib", ONLY_USR_MERGE),
        ("bin", "usr/sbin", ONLY_USR_MERGE),
    ],
)
def test_top_level_symlinks_are_refused(
    tmp_path: Path, name: str, target: str, reason: str
) -> None:
    root = _usr_merged(tmp_path)
    path = root / name
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        path.rmdir()
    os.symlink(target, path)
    with pytest.raises(LfsorchError) as raised:
        chrootroot.survey_top(root)
    expected = f"the partition {root} has a top-level symlink {name} -> {target}{reason}"
    assert raised.value.message == expected


def test_a_partition_that_is_not_usr_merged_is_refused(tmp_path: Path) -> None:
    root = _usr_merged(tmp_path)
    (root / "sbin").unlink()
    (root / "sbin").mkdir()
    with pytest.raises(LfsorchError) as raised:
        chrootroot.survey_top(root)
    assert raised.value.message == (
        f"the partition {root} is not usr-merged: sbin is a directory, not a link to usr/sbin"
    )


def test_paths_resolve_inside_the_root_as_the_kernel_resolves_them(tmp_path: Path) -> None:
    root = _usr_merged(tmp_path)
    (root / "usr/bin/busybox").write_text("")
    os.symlink("busybox", root / "usr/bin/sh")
    os.symlink("/../../../usr/bin/sh", root / "usr/bin/escape")
    os.symlink("loop", root / "usr/bin/loop")
    resolve = chrootroot.resolve_in_root
    assert resolve(root, "/bin/../bin/sh") == root / "usr/bin/busybox"
    assert resolve(root, "/usr/bin/escape") == root / "usr/bin/busybox"
    assert resolve(root, "/usr/bin/loop") is None
    assert resolve(root, "/lib64/ld-linux-x86-64.so.2") is None


def test_the_shell_s_loader_and_script_interpreters_are_followed(tmp_path: Path) -> None:
    root = _usr_merged(tmp_path)
    with pytest.raises(LfsorchError) as raised:
        chrootroot.check_shell(root)
    assert raised.value.message == (
        f"the partition {root} has no usr/bin/bash: a chroot package runs the partition's own bash"
    )
    shutil.copy2("/usr/bin/bash", root / "usr/bin/bash")  # the host's: dynamically linked
    with pytest.raises(LfsorchError) as raised:
        chrootroot.check_shell(root)
    assert "has no lib64/ld-linux-x86-64.so.2, the interpreter" in raised.value.message
    (root / "lib64/ld-linux-x86-64.so.2").write_bytes(b"\x7fELF")
    chrootroot.check_shell(root)
    (root / "usr/bin/bash").write_text("#!/usr/bin/sh\nexec busybox sh\n")
    with pytest.raises(LfsorchError) as raised:
        chrootroot.check_shell(root)
    assert "has no usr/bin/sh, the interpreter /usr/bin/bash needs" in raised.value.message


def test_the_essential_files_must_be_regular_files(tmp_path: Path) -> None:
    root = _usr_merged(tmp_path)
    (root / "etc/hostname").write_text("lfs\n")
    os.symlink("/etc/hosts", root / "etc/hosts")
    with pytest.raises(LfsorchError) as raised:
        chrootroot.check_essential_files(root)
    assert raised.value.message.startswith(
        f"the partition {root} has no etc/hosts, etc/resolv.conf (a regular file, not a link)"
    )


def test_the_root_image_is_the_three_links_and_always_the_same_bytes() -> None:
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(root_image_tar())) as tar:
        members = [(m.name, m.issym(), m.linkname) for m in tar.getmembers()]
    assert members == [(n, True, f"usr/{n}") for n in ("bin", "lib", "sbin")]
    assert root_image_tar() == root_image_tar()
    assert ROOT_IMAGE.startswith("lfsorch/")


def test_the_command_is_the_partition_s_bash_with_the_book_s_environment(tmp_path: Path) -> None:
    job = BuildJob(
        run_id="r", stage="s", package="p", attempt=1, image="i", script="make",
        environment={"MAKEFLAGS": "-j2"}, lfs_dir=tmp_path, log_path=tmp_path / "log",
        timeout_s=60, chroot=True,
    )  # fmt: skip
    command = chroot_command(job)
    assert command[:2] == ["/usr/bin/bash", "-c"]
    assert command[3:] == ["lfsorch", "umask 022\nmake", "MAKEFLAGS=-j2"]
    assert "env -i HOME=/root TERM=dumb" in command[2]
    assert "/usr/bin/bash --login -eo pipefail -c" in command[2]


def test_a_chroot_stage_with_a_user_is_refused(tmp_path: Path) -> None:
    text = "stage: s\nchroot: true\nuser: lfs\npackages:\n  - {name: p, script: make}\n"
    with pytest.raises(StageFileError) as raised:
        parse_stage_text(text, tmp_path / "s.yaml")
    assert "user 'lfs' cannot apply to chroot packages (p): they run as root" in str(raised.value)
    allowed = text.replace("chroot: true", "chroot: true\ncapabilities: [setfcap]").replace(
        "user: lfs\n", ""
    )
    assert parse_stage_text(allowed, tmp_path / "s.yaml").stage.capabilities == ["setfcap"]


def test_the_build_tree_s_size_counts_what_it_holds_and_follows_no_link(tmp_path: Path) -> None:
    from orchestrator.execution.chroot import tree_size

    (tmp_path / "build/sub").mkdir(parents=True)
    (tmp_path / "build/sub/big").write_bytes(b"x" * (1 << 20))
    (tmp_path / "outside").write_bytes(b"y" * (4 << 20))
    os.symlink(tmp_path / "outside", tmp_path / "build/link")
    os.symlink(tmp_path, tmp_path / "build/loop")
    size = tree_size(tmp_path / "build")
    assert 1 << 20 <= size < 2 << 20


MOUNTINFO = (
    "120 119 254:0 /var/tmp/lfs/usr /usr rw,relatime - ext4 /dev/vda rw\n"
    "121 119 254:0 /var/tmp/lfs/my\\040dir /my\\040dir rw,relatime - ext4 /dev/vda rw\n"
    "122 119 0:55 / /proc rw,nosuid - proc proc rw\n"
    "123 122 0:5 /null /proc/kcore rw,nosuid - devtmpfs udev rw\n"
    "124 119 0:56 / /dev/pts rw - devpts devpts rw,gid=5,mode=620\n"
)


def test_mount_points_are_read_unescaped() -> None:
    assert chrootroot.mount_points(MOUNTINFO) == [
        "/usr",
        "/my dir",
        "/proc",
        "/proc/kcore",
        "/dev/pts",
    ]


def _container_view(tmp_path: Path, extra_mount: str = "") -> tuple[Path, Path]:
    """A partition and what /proc/PID of its container would show: `root` (here the
    partition itself) and `mountinfo`."""
    lfs = _usr_merged(tmp_path / "lfs")
    for name in chrootroot.ESSENTIAL_FILES:
        (lfs / name).write_text("x\n")
    (lfs / "my dir").mkdir()
    process = tmp_path / "proc-pid"
    process.mkdir()
    os.symlink(lfs, process / "root")
    (process / "mountinfo").write_text(MOUNTINFO + extra_mount)
    return lfs, process / "root"


def test_binds_that_are_the_checked_files_and_only_the_engine_s_own_mounts_pass(
    tmp_path: Path,
) -> None:
    lfs, root = _container_view(tmp_path)
    top = chrootroot.survey_top(lfs)
    identities = chrootroot.bound_identities(lfs, top)
    targets = ["/usr", "/my dir", "/lib64", "/etc"]
    chrootroot.check_bound(lfs, identities, targets, root)


def test_a_mount_nobody_asked_for_is_refused(tmp_path: Path) -> None:
    lfs, root = _container_view(
        tmp_path, "125 119 254:0 /etc/shadow /tmp/x rw - ext4 /dev/vda rw\n"
    )
    identities = chrootroot.bound_identities(lfs, chrootroot.survey_top(lfs))
    with pytest.raises(LfsorchError) as raised:
        chrootroot.check_bound(lfs, identities, ["/usr", "/my dir"], root)
    assert raised.value.message == (
        f"the partition {lfs} changed while a chroot container was being made: the engine "
        "mounted something at /tmp/x, which lfsorch did not ask for; nothing ran in the container"
    )


def test_an_etc_file_replaced_by_a_link_with_its_old_inode_number_is_not_the_checked_file(
    tmp_path: Path,
) -> None:
    lfs, root = _container_view(tmp_path)
    identities = chrootroot.bound_identities(lfs, chrootroot.survey_top(lfs))
    device, inode, _ = identities["/etc/hosts"]
    # The same device and inode number, another type: what a freed inode reused looks like.
    identities["/etc/hosts"] = (device, inode, 0o120000)
    with pytest.raises(LfsorchError) as raised:
        chrootroot.check_bound(lfs, identities, [], root)
    assert "etc/hosts is no longer what was checked (now another file)" in raised.value.message
