"""Where lfsorch keeps everything it writes: one workspace directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

HOME_ENV = "LFSORCH_HOME"


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
