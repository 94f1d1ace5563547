"""Where lfsorch keeps everything it writes: one workspace directory, and its lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from orchestrator.errors import ExitCode, LfsorchError

HOME_ENV = "LFSORCH_HOME"


class WorkspaceBusy(LfsorchError):
    exit_code = ExitCode.UNAVAILABLE


@dataclass(frozen=True)
class Workspace:
    """Layout of the workspace. Nothing is created until a command needs it."""

    root: Path

    @classmethod
    def from_env(cls) -> Workspace:
        explicit = os.environ.get(HOME_ENV)
        if explicit:
            return cls(Path(explicit).expanduser().resolve())
        return cls(Path(platformdirs.user_data_dir("lfsorch")))

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def state_file(self) -> Path:
        """The record of the last run, which resume and `status` read."""
        return self.root / "state.json"

    @property
    def partitions_dir(self) -> Path:
        """Per partition (by identity), the record its resume reads."""
        return self.root / "partitions"

    @property
    def sources_dir(self) -> Path:
        return self.root / "sources"

    @property
    def snapshots_dir(self) -> Path:
        return self.root / "snapshots"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def images_dir(self) -> Path:
        """Scratch space for image bootstraps (debootstrap trees)."""
        return self.root / "images"

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    def ensure(self, *dirs: Path) -> None:
        for directory in (self.root, *dirs):
            directory.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def workspace_lock(workspace: Workspace) -> Iterator[None]:
    """One run per workspace at a time: the state file and the partition are not shareable."""
    workspace.ensure()
    lock_path = workspace.root / "run.lock"
    with lock_path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise WorkspaceBusy(
                f"another lfsorch run holds the workspace {workspace.root} (pid {holder})",
                hint="wait for it to finish, or use another LFSORCH_HOME",
            ) from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
