"""The LFS partition a run builds into: its path, identity, safety checks, lock and record.

Identity is the resolved path plus a random id kept in a marker directory at the partition's
top (`.lfsorch-partition/id`, created on first use). Snapshots, keys and drift checks never
see that directory and restores keep it, so a copied or moved partition is a new partition
and two empty partitions still share checkpoints. The lock lives in the same directory, so
every workspace that builds into the partition sees it.

The marker directory is writable by builds (the partition is mounted read-write), so it is
opened without following symlinks: a build cannot make lfsorch write through it elsewhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.checkpoints import mounts
from orchestrator.checkpoints.treescan import PARTITION_MARKER
from orchestrator.errors import ExitCode, LfsorchError, local_file_error
from orchestrator.execution import engine
from orchestrator.workspace import Workspace

ID_FILE = "id"
LOCK_FILE = "lock"
# Which workspace holds the partition's record and how its last run there ended. Another
# workspace has no record of the partition and would otherwise take a half-built tree for
# a fresh one.
LAST_RUN_FILE = "last-run"
CLEAN_OUTCOMES = ("succeeded", "restored")
_ID = re.compile(r"[0-9a-f]{32}")

# Directories whose contents belong to the system: a build writes into its partition as
# root and a restore deletes what the snapshot lacks, so none of these can be one.
SYSTEM_DIRS = frozenset(
    {
        "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32",
        "/lost+found", "/media", "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/snap",
        "/srv", "/sys", "/tmp", "/usr", "/var", "/usr/bin", "/usr/lib", "/usr/local",
        "/usr/sbin", "/usr/share", "/var/cache", "/var/lib", "/var/log", "/var/tmp",
    }
)  # fmt: skip
_PARTITION_HINT = "pass a directory of its own, e.g. --lfs /mnt/lfs or a new empty directory"
_WORKSPACE_HINT = "set LFSORCH_HOME to a directory of its own, e.g. ~/.local/share/lfsorch"


class UnsafePath(LfsorchError):
    """A partition or workspace that lfsorch refuses to build into, restore or write."""

    exit_code = ExitCode.USER_ERROR


class PartitionBusy(LfsorchError):
    exit_code = ExitCode.UNAVAILABLE


class PartitionHalfBuilt(LfsorchError):
    """The partition was left half-built by a run whose record this workspace lacks."""

    exit_code = ExitCode.USER_ERROR


def _system_reason(path: str) -> str | None:
    home = os.path.realpath(os.path.expanduser("~"))
    if path == "/":
        return "it is the root directory"
    if path in SYSTEM_DIRS:
        return "it is a system directory"
    if path == home:
        return "it is your home directory"
    # A bind mount of one of them has another path but the same directory.
    same = _same_directory(path, sorted(SYSTEM_DIRS | {home}))
    if same is not None:
        return f"it is {same} mounted at another path"
    return None


def _same_directory(path: str, candidates: list[str]) -> str | None:
    try:
        found = os.stat(path)
    except OSError:
        return None
    for candidate in candidates:
        try:
            other = os.stat(candidate)
        except OSError:
            continue
        if (found.st_dev, found.st_ino) == (other.st_dev, other.st_ino):
            return candidate
    return None


def _inside(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith(ancestor.rstrip("/") + "/")


def _shown(given: Path, resolved: str) -> str:
    return str(given) if str(given) == resolved else f"{given} (= {resolved})"


def refuse_unsafe_workspace(workspace: Workspace) -> None:
    """Refuse a workspace that is a system directory or lies inside a partition."""
    root = os.path.realpath(workspace.root)
    reason = _system_reason(root)
    if reason is not None:
        raise UnsafePath(
            f"cannot use {_shown(workspace.root, root)} as the workspace: {reason}",
            hint=_WORKSPACE_HINT,
        )
    for directory in (root, *(str(p) for p in Path(root).parents)):
        if os.path.lexists(os.path.join(directory, PARTITION_MARKER)):
            raise UnsafePath(
                f"the workspace {root} is inside the LFS partition {directory}: "
                "a restore of the partition would delete the snapshots it restores from",
                hint=_WORKSPACE_HINT,
            )


def refuse_unsafe_partition(path: Path, workspace: Workspace) -> None:
    """Refuse `/`, system directories, and any overlap between partition and workspace."""
    resolved = os.path.realpath(path)
    root = os.path.realpath(workspace.root)
    shown = _shown(path, resolved)
    reason = _system_reason(resolved)
    if reason is None and resolved == root:
        reason = "it is the workspace itself"
    if reason is None and _inside(resolved, root):
        reason = f"it is inside the workspace {root}"
    hint = _PARTITION_HINT
    if reason is None and _inside(root, resolved):
        reason = (
            f"it contains the workspace {root}, and a restore would delete the snapshots "
            "it restores from"
        )
        hint = _WORKSPACE_HINT + ", outside the partition"
    if reason is not None:
        raise UnsafePath(f"cannot use {shown} as the LFS partition: {reason}", hint=hint)
    refuse_unsafe_workspace(workspace)


@dataclass(frozen=True)
class Partition:
    """A checked partition; `checked` is the only way to make one."""

    path: Path  # resolved
    workspace: Workspace

    @classmethod
    def checked(cls, path: Path, workspace: Workspace) -> Partition:
        refuse_unsafe_partition(path, workspace)
        return cls(Path(os.path.realpath(path)), workspace)

    # ---- identity

    def _open_marker(self, create: bool) -> int | None:
        """A descriptor of the marker directory, never through a symlink; None if absent."""
        try:
            top = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            raise LfsorchError(
                f"the LFS partition {self.path} is not a directory",
                hint="mount the partition (or create the directory) and pass it with --lfs",
            ) from None
        try:
            if create:
                _make_marker(top)
            return os.open(
                PARTITION_MARKER, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=top
            )
        except FileNotFoundError:
            return None
        except (NotADirectoryError, OSError) as exc:
            if isinstance(exc, NotADirectoryError) or exc.errno == 40:  # ELOOP: a symlink
                raise LfsorchError(
                    f"{self.path / PARTITION_MARKER} is not the directory lfsorch keeps there",
                    hint="remove it (a build may have replaced it); lfsorch makes a new one",
                ) from None
            raise local_file_error(
                exc, "the partition marker", self.path / PARTITION_MARKER
            ) from None
        finally:
            os.close(top)

    def identity(self, *, create: bool = True) -> str | None:
        """This partition's identity; None when it has none yet and `create` is false."""
        marker = self._open_marker(create)
        if marker is None:
            return None
        try:
            token = _read_id(marker) or (_write_id(marker) if create else None)
        except OSError as exc:
            raise local_file_error(
                exc, "the partition marker", self.path / PARTITION_MARKER
            ) from None
        finally:
            os.close(marker)
        if token is None:
            return None
        return hashlib.sha256(f"{self.path}\0{token}".encode()).hexdigest()[:16]

    def record_file(self, identity: str) -> Path:
        """Where this workspace keeps the partition's run record."""
        return self.workspace.partitions_dir / identity / "state.json"

    # ---- lock

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One lfsorch command at a time per partition, whichever workspace it uses."""
        self.identity()
        marker = self._open_marker(create=True)
        assert marker is not None
        try:
            handle = _open_lock_file(marker)
        except OSError as exc:
            raise local_file_error(
                exc, "the partition lock", self.path / PARTITION_MARKER
            ) from None
        finally:
            os.close(marker)
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(handle, 64, 0).decode(errors="replace").strip() or "unknown"
                raise PartitionBusy(
                    f"another lfsorch process (pid {holder}) is using the partition {self.path}",
                    hint="wait for it to finish: one run or restore at a time per partition, "
                    "from any workspace",
                ) from None
            os.ftruncate(handle, 0)
            os.pwrite(handle, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(handle)  # releases the flock

    # ---- the last run, for workspaces without the partition's record

    def note_last_run(self, run_id: str, outcome: str) -> None:
        """Say in the partition which workspace's run last changed it and how it ended."""
        note = json.dumps(
            {"workspace": str(self.workspace.root.resolve()), "run": run_id, "outcome": outcome}
        )
        marker = self._open_marker(create=True)
        assert marker is not None
        scratch = f".{LAST_RUN_FILE}-{secrets.token_hex(8)}"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            handle = os.open(scratch, flags, 0o600, dir_fd=marker)
            try:
                os.write(handle, note.encode())
            finally:
                os.close(handle)
            os.replace(scratch, LAST_RUN_FILE, src_dir_fd=marker, dst_dir_fd=marker)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(scratch, dir_fd=marker)
            raise local_file_error(
                exc, "the partition marker", self.path / PARTITION_MARKER
            ) from None
        finally:
            os.close(marker)

    def refuse_if_half_built(self) -> None:
        """For a workspace with no record of this partition: refuse a partition that a run
        from elsewhere (or a record since lost) left neither finished nor restored."""
        note = self._last_run()
        if note is None or note.get("outcome") in CLEAN_OUTCOMES:
            return
        where = note.get("workspace", "?")
        raise PartitionHalfBuilt(
            f"the partition {self.path} was left {note.get('outcome', '?')} by run "
            f"{note.get('run', '?')} of the workspace {where}, which holds its record and "
            "checkpoints: building here would build on half-installed files",
            hint=f"resume it from there (LFSORCH_HOME={where} lfsorch run ...), or empty the "
            "partition to start over",
        )

    def _last_run(self) -> dict[str, Any] | None:
        marker = self._open_marker(create=False)
        if marker is None:
            return None
        try:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
            handle = os.open(LAST_RUN_FILE, flags, dir_fd=marker)
        except OSError:
            return None
        finally:
            os.close(marker)
        try:
            if not stat.S_ISREG(os.fstat(handle).st_mode):
                return None
            note = json.loads(os.read(handle, 64 << 10))
        except (OSError, ValueError):
            return None
        finally:
            os.close(handle)
        return note if isinstance(note, dict) else None

    # ---- containers

    def refuse_nested_mounts(self, doing: str) -> None:
        """Refuse while filesystems are mounted inside the partition (the host's /dev after
        entering the chroot by hand): snapshots and restores must not walk or delete there."""
        mounts.refuse_nested_mounts(self.path, doing)

    def refuse_live_containers(self, client: Any) -> None:
        """Refuse while a container of a live lfsorch run mounts this partition, naming it.

        Containers of runs that are gone are removed before this (`engine.reap_leftovers`):
        an orphan would otherwise go on writing into a partition just restored.
        """
        live: list[str] = []
        for listed in engine.managed_containers(client, running=True):
            # A tmpfs (a chroot build's /run) has no source: it is no directory of the host.
            sources = [m["Source"] for m in listed.get("Mounts") or [] if m.get("Source")]
            if any(_overlaps(source, str(self.path)) for source in sources):
                labels = listed.get("Labels") or {}
                run = labels.get(engine.RUN) or labels.get(engine.PURPOSE) or "?"
                live.append(f"{engine.container_name(listed)} (run {run})")
        if live:
            raise PartitionBusy(
                f"live lfsorch containers use the partition {self.path}: {', '.join(live)}",
                hint="wait for that run to finish or stop it (Ctrl-C); containers of runs "
                "that are gone are removed by `lfsorch cleanup`",
            )


def _make_marker(top: int) -> None:
    """Create the marker without changing the partition's own metadata: the top directory's
    mtime is part of every snapshot and drift check, and the marker is not the partition's."""
    before = os.stat(top)
    try:
        os.mkdir(PARTITION_MARKER, 0o700, dir_fd=top)
    except FileExistsError:
        return
    os.utime(top, ns=(before.st_atime_ns, before.st_mtime_ns))


def _open_lock_file(marker: int) -> int:
    """The lock file, made anew when a build replaced it: by a FIFO (truncating it fails) or
    by a hard link to a file of the partition (the pid would overwrite that file)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
    handle = os.open(LOCK_FILE, flags, 0o600, dir_fd=marker)
    status = os.fstat(handle)
    if stat.S_ISREG(status.st_mode) and status.st_nlink == 1:
        return handle
    os.close(handle)
    os.unlink(LOCK_FILE, dir_fd=marker)
    return os.open(LOCK_FILE, flags | os.O_EXCL, 0o600, dir_fd=marker)


def _overlaps(source: str, partition: str) -> bool:
    source = source.rstrip("/") or "/"
    return _inside(source, partition) or _inside(partition, source)


def _read_id(marker: int) -> str | None:
    """The id, or None when it is missing or not a regular file (a build may have put a FIFO
    there: opened without O_NONBLOCK it would hang every command on the partition)."""
    try:
        handle = os.open(ID_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=marker)
    except FileNotFoundError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            return None
        text = os.read(handle, 256).decode(errors="replace").strip()
    finally:
        os.close(handle)
    return text if _ID.fullmatch(text) else None


def _write_id(marker: int) -> str:
    """Create the id atomically: two processes on a fresh partition agree on one id."""
    token = secrets.token_hex(16)
    scratch = f".id-{token}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    handle = os.open(scratch, flags, 0o600, dir_fd=marker)
    try:
        os.write(handle, f"{token}\n".encode())
    finally:
        os.close(handle)
    try:
        try:
            os.link(scratch, ID_FILE, src_dir_fd=marker, dst_dir_fd=marker, follow_symlinks=False)
        except FileExistsError:
            if _read_id(marker) is None:  # damaged (a build wrote to it): a new partition
                os.replace(scratch, ID_FILE, src_dir_fd=marker, dst_dir_fd=marker)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(scratch, dir_fd=marker)
    found = _read_id(marker)
    if found is None:
        raise LfsorchError(f"cannot give the partition marker {ID_FILE} an id")
    return found
