"""The record of a run: what was built, how each attempt went. Resume and `status` read it."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from orchestrator.errors import LfsorchError, local_file_error

Status = Literal["pending", "running", "done", "failed", "skipped"]


def now_iso() -> str:
    """Milliseconds: runs started within one second still sort in the order they began."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Attempt(BaseModel):
    number: int
    started: str
    duration_s: float | None = None
    exit_code: int | None = None
    oom_killed: bool = False
    timed_out: bool = False
    interrupted: bool = False
    error: str | None = None
    # The recovery decision after a failed attempt: its class, the strategy, and what the
    # next attempt changed (`-j1`, `memory 512MiB`); None for attempts that succeeded.
    failure_class: str | None = None
    strategy: str | None = None
    reason: str | None = None  # why the strategy decided so (the failure, and what was left)
    change: str | None = None


class PackageState(BaseModel):
    stage: str
    name: str
    status: Status = "pending"
    definition: str = ""
    attempts: list[Attempt] = Field(default_factory=list)
    exit_code: int | None = None
    oom_killed: bool = False
    timed_out: bool = False
    duration_s: float | None = None
    cpu_seconds: float | None = None
    memory_peak_bytes: int | None = None
    read_bytes: int | None = None
    write_bytes: int | None = None
    io_source: str | None = None
    pids_peak: int | None = None
    # None when another package was built beside it: the partition's growth is not its alone.
    disk_added_bytes: int | None = None
    log: str | None = None
    finished: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.stage, self.name)


class RunState(BaseModel):
    run_id: str
    started: str = Field(default_factory=now_iso)
    finished: str | None = None
    lfs: str
    partition: str | None = None  # the partition's identity (None in older records)
    files: list[str]
    owner_pid: int = Field(default_factory=os.getpid)
    outcome: Literal["running", "succeeded", "failed", "interrupted"] = "running"
    packages: list[PackageState] = Field(default_factory=list)
    # Checkpoints: the partition as the first stage found it, what each stage (or
    # "stage/package") was checkpointed as, and the checkpoint the partition equals now
    # (None while a build may have changed it since).
    base_stage: str | None = None
    base_key: str | None = None
    checkpoints: dict[str, str] = Field(default_factory=dict)
    partition_at: str | None = None

    def under_way(self) -> bool:
        """Recorded as running by a process that still exists (not one killed mid-build)."""
        return self.outcome == "running" and process_exists(self.owner_pid)

    def outcome_now(self) -> str:
        """The outcome, where a record left `running` by a killed process says so."""
        if self.outcome == "running" and not self.under_way():
            return "stopped (its process is gone)"
        return self.outcome

    def find(self, stage: str, name: str) -> PackageState | None:
        for package in self.packages:
            if package.stage == stage and package.name == name:
                return package
        return None

    def status_json(self) -> dict[str, object]:
        keys = (
            "stage", "name", "status", "exit_code", "oom_killed", "timed_out", "duration_s",
            "cpu_seconds", "memory_peak_bytes", "read_bytes", "write_bytes", "io_source",
            "pids_peak", "disk_added_bytes", "log",
        )  # fmt: skip
        packages = []
        for package in self.packages:
            record: dict[str, object] = {key: getattr(package, key) for key in keys}
            record["attempts"] = len(package.attempts)
            record["attempt_log"] = [a.model_dump() for a in package.attempts]
            packages.append(record)
        return {"run_id": self.run_id, "outcome": self.outcome, "packages": packages}


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def save_state(state: RunState, path: Path) -> None:
    """Write atomically, so a crash mid-write never leaves a half state file.

    No fsync: it cost tens of milliseconds per package under a build's disk load, and the
    rename already gives the old record or the new one; a record older by a package after a
    power cut only means a resume restores one checkpoint further back.
    """
    temporary: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".state-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(state.model_dump_json(indent=2))
        os.replace(temporary, path)
    except OSError as exc:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        raise local_file_error(exc, "the run record", path) from None


def load_state(path: Path) -> RunState | None:
    try:
        return RunState.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise local_file_error(exc, "the run record", path) from None
    except (ValueError, ValidationError) as exc:
        raise LfsorchError(
            f"the run record {path} is unreadable ({exc.__class__.__name__})",
            hint="move it aside to start afresh",
        ) from None
