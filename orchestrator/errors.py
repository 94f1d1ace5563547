"""Error types, and the one table of the exit statuses lfsorch ends with. Every error a user
can cause carries a message that says what to do. Imports nothing of lfsorch."""

from __future__ import annotations

import enum
import errno


class ExitCode(enum.IntEnum):
    """What `lfsorch` exits with; every error class names its status from here."""

    OK = 0  # the command did what it was asked
    FAILED = 1  # a package or a check failed, or a local file cannot be used
    USER_ERROR = 2  # wrong input: stage file, configuration, option, refused path; nothing built
    UNAVAILABLE = 3  # not now: no engine, an image missing, workspace or partition in use
    SOURCES = 4  # a source file is missing, does not match its checksum, or was refused
    INTERRUPTED = 130  # Ctrl-C or SIGTERM; running containers were stopped and removed


class LfsorchError(Exception):
    """Base of all errors the CLI reports as one readable message instead of a traceback."""

    exit_code: ExitCode = ExitCode.FAILED

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(LfsorchError):
    """A configuration value or file is wrong."""

    exit_code = ExitCode.USER_ERROR


class EngineUnavailable(LfsorchError):
    """No Docker engine answers."""

    exit_code = ExitCode.UNAVAILABLE


class ImageMissing(LfsorchError):
    """A stage's image is not present in the engine."""

    exit_code = ExitCode.UNAVAILABLE


class LocalFileError(LfsorchError):
    """A file or directory lfsorch reads or writes on this machine is unusable."""


_LOCAL_FILE_HINTS = {
    errno.EISDIR: ("is a directory where a file belongs", "move it aside and run again"),
    errno.ENOTDIR: ("is not a directory", "move it aside and run again"),
    errno.EROFS: (
        "is on a read-only file system",
        "point LFSORCH_HOME at a writable directory (or remount it read-write)",
    ),
    errno.EACCES: ("is not accessible (permission denied)", "check its owner and mode"),
    errno.EPERM: ("cannot be changed (operation not permitted)", "check its owner and flags"),
    errno.ENOSPC: (
        "cannot be written: no space left on its device",
        "free space (e.g. `lfsorch snapshots prune --keep N`) or point LFSORCH_HOME at a "
        "larger disk",
    ),
    errno.EDQUOT: ("cannot be written: disk quota exceeded", "free space or raise the quota"),
}


def local_file_error(exc: OSError, what: str = "", path: object = None) -> LocalFileError:
    """One readable line for a failed file operation on `path` (default: the error's own
    file name), with what to do about it. `what` names the file's role ("the run record")."""
    name = path if path is not None else exc.filename
    problem, hint = _LOCAL_FILE_HINTS.get(
        exc.errno or 0, (f"failed: {exc.strerror or exc}", "check it and run again")
    )
    subject = " ".join(str(part) for part in (what, name) if part) or "a local file"
    return LocalFileError(f"{subject} {problem}", hint=hint)
