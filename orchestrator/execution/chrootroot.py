"""What a partition must hold before a container can use it as its root filesystem, read
from the host without running anything in it.

The container's root is a tiny image of the usr-merge links (`bin`, `lib`, `sbin` ->
`usr/...`) with each real top-level directory of the partition bound onto it. So the top level
must be usr-merged, hold no symlink of its own (the engine would follow it on the host), and
give the shell the container starts with everything it needs to execute: the engine reports a
missing loader as `exec /usr/bin/bash: no such file or directory`, which names the wrong file.
"""

from __future__ import annotations

import os
import re
import stat
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from orchestrator.checkpoints.treescan import PARTITION_MARKER
from orchestrator.errors import LfsorchError

SHELL = "/usr/bin/bash"
USR_MERGED = ("bin", "lib", "sbin")
# Given by the engine (dev, proc, sys), a tmpfs (run), or by lfsorch (build, sources, stage):
# the partition's own entries of these names are not bound.
PROVIDED = ("build", "dev", "proc", "run", "sources", "stage", "sys")
# Without them in the partition, the engine writes empty ones of its own into its etc.
ESSENTIAL_FILES = ("etc/hosts", "etc/hostname", "etc/resolv.conf")
_MAX_LINKS = 40  # the kernel's own limit on symlinks followed in one lookup
_MAX_SCRIPT_DEPTH = 4  # `#!` interpreters followed, as the kernel's binfmt_script does
_PT_INTERP = 3
_USR_MERGE_HINT = (
    "make the partition's top level as the book's chapter 4 does: "
    "`ln -s usr/bin bin`, `ln -s usr/lib lib`, `ln -s usr/sbin sbin`, real directories else"
)


# What a bind source was when checked: device, inode and file type (a symlink given a
# freed inode's number is not the file it replaced).
Identity = tuple[int, int, int]
# The engine's own mounts (the container's /proc, /sys and /dev, and what it masks in them).
ENGINE_MOUNT_ROOTS = ("/dev", "/proc", "/sys")


@dataclass(frozen=True)
class ChrootTop:
    """The partition's top level as the chroot container shows it."""

    directories: tuple[str, ...]  # bound read-write at /NAME
    skipped: tuple[str, ...]  # neither directory nor usr-merge link: not visible


def survey_top(lfs: Path) -> ChrootTop:
    """The directories to bind; refuses a top level that is not usr-merged or that holds a
    symlink the engine would follow out of the partition."""
    directories, skipped = [], []
    for name in sorted(os.listdir(lfs)):
        if name == PARTITION_MARKER or name in PROVIDED:
            continue
        info = os.lstat(lfs / name)
        if stat.S_ISLNK(info.st_mode):
            _check_top_link(lfs, name)
        elif not stat.S_ISDIR(info.st_mode):
            skipped.append(name)
        elif name in USR_MERGED:
            raise LfsorchError(
                f"the partition {lfs} is not usr-merged: {name} is a directory, "
                f"not a link to usr/{name}",
                hint=_USR_MERGE_HINT,
            )
        else:
            directories.append(name)
    return ChrootTop(tuple(directories), tuple(skipped))


def _check_top_link(lfs: Path, name: str) -> None:
    target = os.readlink(lfs / name)
    if name in USR_MERGED and target.rstrip("/") in (f"usr/{name}", f"/usr/{name}"):
        return
    if os.path.isabs(target) or ".." in PurePosixPath(target).parts:
        raise LfsorchError(
            f"the partition {lfs} has a top-level symlink {name} -> {target}, which points "
            "outside the partition: the engine would bind the host's directory",
            hint=f"remove {lfs / name} or replace it with a real directory",
        )
    raise LfsorchError(
        f"the partition {lfs} has a top-level symlink {name} -> {target}: only bin, lib and "
        "sbin may be links (to usr/...) in a chroot stage's root",
        hint=f"replace {lfs / name} with a real directory",
    )


def check_essential_files(lfs: Path) -> None:
    """etc/hosts, etc/hostname and etc/resolv.conf as regular files of the partition."""
    missing = [name for name in ESSENTIAL_FILES if not _is_regular(lfs / name)]
    if missing:
        raise LfsorchError(
            f"the partition {lfs} has no {', '.join(missing)} (a regular file, not a link): a "
            "chroot package sees the partition's own, and the engine would otherwise leave "
            "empty files of its own there",
            hint="create them before the first chroot package, in a `chroot: false` package "
            "(the book's section 7.6)",
        )


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def check_shell(lfs: Path) -> None:
    """The partition's bash, and every interpreter it needs (its ELF loader, or a script's
    `#!` program), exist in the partition as the container will resolve them."""
    program = SHELL
    for _ in range(_MAX_SCRIPT_DEPTH):
        found = resolve_in_root(lfs, program)
        if found is None or not found.is_file():
            raise _missing(lfs, program)
        interpreter = _interpreter(found)
        if interpreter is None:
            return
        program = interpreter
    raise LfsorchError(
        f"{SHELL} of the partition {lfs} names interpreters more than {_MAX_SCRIPT_DEPTH} deep",
        hint=f"install a real bash at {lfs}{SHELL}",
    )


def _missing(lfs: Path, program: str) -> LfsorchError:
    if program == SHELL:
        return LfsorchError(
            f"the partition {lfs} has no usr/bin/bash: a chroot package runs the partition's "
            "own bash",
            hint="build the temporary tools into the partition first (chapter 6's bash)",
        )
    return LfsorchError(
        f"the partition {lfs} has no {program.lstrip('/')}, the interpreter {SHELL} needs: "
        f"the container would fail with `exec {SHELL}: no such file or directory`",
        hint="install glibc into the partition (the book's chapter 5) and keep lib64 a real "
        "directory of the partition",
    )


def _interpreter(path: Path) -> str | None:
    """The program the kernel runs for `path`: an ELF file's PT_INTERP, a script's `#!`."""
    with path.open("rb") as program:
        head = program.read(64)
        if head.startswith(b"#!"):
            words = head[2:].split(b"\n", 1)[0].split()
            return words[0].decode(errors="replace") if words else None
        if head[:4] != b"\x7fELF" or len(head) < 64:
            return None
        return _elf_interpreter(program, head)


def _elf_interpreter(elf: BinaryIO, head: bytes) -> str | None:
    order = "<" if head[5] == 1 else ">"
    if head[4] == 2:  # 64-bit
        table, entry_size, count = struct.unpack_from(order + "Q14xHH", head, 32)
        layout = order + "I4xQ16xQ"
    else:
        table, entry_size, count = struct.unpack_from(order + "I10xHH", head, 28)
        layout = order + "II8xI"
    for index in range(min(count, 256)):
        elf.seek(table + index * entry_size)
        header = elf.read(entry_size)
        if len(header) < struct.calcsize(layout):
            return None
        kind, offset, size = struct.unpack_from(layout, header)
        if kind == _PT_INTERP:
            elf.seek(offset)
            return elf.read(min(size, 4096)).split(b"\0", 1)[0].decode(errors="replace")
    return None


def resolve_in_root(root: Path, path: str) -> Path | None:
    """`path` looked up as the kernel does with `root` as `/`: symlinks followed inside it,
    `..` stopping at it. None when a component is missing or links loop."""
    pending = [part for part in PurePosixPath(path).parts if part != "/"]
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part in (".", ""):
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        current = root.joinpath(*resolved, part)
        try:
            info = os.lstat(current)
        except OSError:
            return None
        if not stat.S_ISLNK(info.st_mode):
            resolved.append(part)
            continue
        links += 1
        if links > _MAX_LINKS:
            return None
        target = os.readlink(current)
        if target.startswith("/"):
            resolved = []
        pending = [p for p in PurePosixPath(target).parts if p != "/"] + pending
    return root.joinpath(*resolved)


def bound_identities(lfs: Path, top: ChrootTop) -> dict[str, Identity]:
    """Each bind source of the container (`/NAME` and the essential files) as it is now: a
    real directory or regular file of the partition. Taken after the checks, so that what
    the engine later binds can be compared with what was checked."""
    wanted = [(f"/{name}", stat.S_IFDIR) for name in top.directories]
    wanted += [(f"/{name}", stat.S_IFREG) for name in ESSENTIAL_FILES]
    identities = {}
    for target, kind in wanted:
        try:
            info = os.lstat(lfs / target.lstrip("/"))
        except OSError:
            raise changed_under_the_engine(lfs, target) from None
        if stat.S_IFMT(info.st_mode) != kind:
            raise changed_under_the_engine(lfs, target)
        identities[target] = (info.st_dev, info.st_ino, kind)
    return identities


def check_bound(
    lfs: Path, identities: dict[str, Identity], targets: Collection[str], container_root: Path
) -> None:
    """The container holds the checked binds and nothing else of the host's.

    Its root is read through `container_root` (/proc/PID/root). A top-level directory or an
    etc file swapped for a symlink between the check and the start makes the engine bind
    what the link names on the host: at the target when a directory is swapped, at the
    link's target inside the container when a file is. So each bind target must be the
    checked file, and every mount point must be a requested target or the engine's own."""
    for target, identity in identities.items():
        try:
            info = os.stat(container_root / target.lstrip("/"), follow_symlinks=False)
        except OSError:
            raise changed_under_the_engine(lfs, target) from None
        if (info.st_dev, info.st_ino, stat.S_IFMT(info.st_mode)) != identity:
            raise changed_under_the_engine(lfs, target)
    mountinfo = (container_root.parent / "mountinfo").read_text()
    expected = {"/", *targets}
    for point in mount_points(mountinfo):
        engine_own = any(
            point.startswith(f"{root}/") or point == root for root in ENGINE_MOUNT_ROOTS
        )
        if point not in expected and not engine_own:
            raise LfsorchError(
                f"the partition {lfs} changed while a chroot container was being made: the "
                f"engine mounted something at {point}, which lfsorch did not ask for; "
                "nothing ran in the container",
                hint=_CHANGED_HINT,
            )


def mount_points(mountinfo: str) -> list[str]:
    """The mount points of a /proc/PID/mountinfo, unescaped (`\\040` is a space)."""
    points = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) > 4:
            points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
    return points


_CHANGED_HINT = (
    "another process (a `chroot: false` package of the same partition, say) changed its top "
    "level or etc/hosts, etc/hostname, etc/resolv.conf; check the partition and run again"
)


def changed_under_the_engine(lfs: Path, target: str) -> LfsorchError:
    source = lfs / target.lstrip("/")
    try:
        now = f"a symlink to {os.readlink(source)}"
    except FileNotFoundError:
        now = "gone"
    except OSError:
        now = "another file"
    return LfsorchError(
        f"the partition {lfs} changed while a chroot container was being made: "
        f"{target.lstrip('/')} is no longer what was checked (now {now}); nothing ran in "
        "the container",
        hint=_CHANGED_HINT,
    )
