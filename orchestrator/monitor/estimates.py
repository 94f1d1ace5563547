"""How long a package should take: its newest recorded build time in the workspace's runs
(scaled to this machine's SBU where both runs have one), else the book's SBU (`sbu:` in the
stage file) times one SBU. `ci plan` cuts jobs with these, and `report` says how long a run
under way has to go."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from orchestrator.build.state import load_state
from orchestrator.errors import LfsorchError

SBU_REFERENCE = "binutils-pass1"


@dataclass(frozen=True)
class Estimate:
    seconds: float
    source: str  # "history" or "book"


@dataclass(frozen=True)
class Recorded:
    seconds: float
    reference_s: float | None  # that run's binutils-pass1, the SBU


@dataclass
class History:
    """The newest recorded build time of each package (`stage/package`) in the workspace's runs."""

    packages: dict[str, Recorded]
    sbu_s: float | None  # the newest run's SBU, where one had the reference package

    @classmethod
    def read(cls, runs_dir: Path) -> History:
        states = []
        for record in sorted(runs_dir.glob("*/state.json")) if runs_dir.is_dir() else []:
            try:
                state = load_state(record)
            except LfsorchError:
                continue  # an unreadable record estimates nothing
            if state is not None:
                states.append(state)
        states.sort(key=lambda s: (s.started, s.run_id), reverse=True)
        packages: dict[str, Recorded] = {}
        sbu_s = None
        for state in states:
            done = {
                f"{p.stage}/{p.name}": p.duration_s
                for p in state.packages
                if p.status == "done" and p.duration_s is not None and math.isfinite(p.duration_s)
            }
            reference = next(
                (s for n, s in done.items() if n.split("/", 1)[1] == SBU_REFERENCE), None
            )
            reference = reference if reference and reference > 0 else None
            sbu_s = sbu_s or reference
            for name, seconds in done.items():
                assert seconds is not None
                packages.setdefault(name, Recorded(max(seconds, 0.0), reference))
        return cls(packages, sbu_s)


def estimate(
    name: str, book_sbu: float | None, history: History, sbu_seconds: float | None
) -> Estimate | None:
    """One package's build time (`name` is `stage/package`), or None where nothing tells.

    With `sbu_seconds` (one SBU where it will be built), a recorded time counts only if its run
    measured an SBU too, and is scaled by the two; without it, recorded times count as they are
    and the newest run's SBU prices the book's figure.
    """
    recorded = history.packages.get(name)
    if recorded is not None and (sbu_seconds is None or recorded.reference_s):
        seconds = recorded.seconds
        if sbu_seconds is not None and recorded.reference_s:
            seconds = recorded.seconds / recorded.reference_s * sbu_seconds
        return Estimate(seconds, "history")
    sbu = sbu_seconds or history.sbu_s
    if book_sbu is not None and sbu is not None:
        return Estimate(book_sbu * sbu, "book")
    return None
