"""Build output reaches the log file byte for byte, every attempt kept, with bounded memory."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.runner import PROGRESS_LINE_MAX_BYTES, LineTracker
from orchestrator.workspace import Workspace
from tests.conftest import REPO

# What lfsorch itself may hold while 300 MB of output pass through it.
MAX_RSS_BYTES = 300 << 20
FLOOD_BYTES = 300_000_000

# Prints PAYLOAD to the log and its sha256, computed inside the container, after a marker.
# `tee /dev/fd/3` duplicates the output without a file; yes(1) is a process substitution so
# pipefail does not see it die of SIGPIPE.
_DIGESTED = """\
{{ {payload} | tee /dev/fd/3 | sha256sum | cut -c1-64 > /tmp/sum; }} 3>&1
printf '\\n@@sha256 %s\\n' "$(cat /tmp/sum)"
"""


def _digested(payload: str) -> str:
    return _DIGESTED.format(payload=payload)


def _attempts(log: bytes, label: str) -> list[tuple[bytes, str]]:
    """(payload, sha256 computed in the container) of every attempt, in order."""
    found = []
    number = 1
    while True:
        header = f"=== lfsorch: {label} attempt {number} ===\n".encode()
        start = log.find(header)
        if start < 0:
            return found
        start += len(header)
        marker = log.rindex(b"\n@@sha256 ", start, _next_header(log, label, number + 1))
        digest = log[marker + 10 : marker + 74].decode()
        found.append((log[start:marker], digest))
        number += 1


def _next_header(log: bytes, label: str, number: int) -> int:
    position = log.find(f"=== lfsorch: {label} attempt {number} ===\n".encode())
    return len(log) if position < 0 else position


def _run_measured(args: list[str], env: dict[str, str], out: Path) -> tuple[int, int]:
    """Run the CLI; return its exit status and its peak resident memory in bytes."""
    with out.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            cwd=REPO,
        )
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_maxrss * 1024


def _log(workspace: Workspace, stage: str, package: str) -> bytes:
    (path,) = workspace.root.glob(f"runs/*/logs/{stage}/{package}.log")
    return path.read_bytes()


class TestLineTracker:
    def test_counts_lines_and_keeps_the_last_complete_one(self) -> None:
        tracker = LineTracker()
        assert tracker.feed(b"one\ntw") is True
        assert tracker.feed(b"o\nthr") is True
        assert (tracker.count, tracker.last_text) == (2, "two")
        assert tracker.feed(b"ee") is False
        tracker.finish()
        assert (tracker.count, tracker.last_text) == (3, "three")

    def test_a_flood_without_newlines_is_never_held(self) -> None:
        tracker = LineTracker()
        for _ in range(1000):
            tracker.feed(b"x" * 65536)
        tracker.feed(b"\n")
        assert tracker.count == 1
        assert tracker.last == b"x" * PROGRESS_LINE_MAX_BYTES

    def test_long_lines_in_one_chunk_are_cut(self) -> None:
        tracker = LineTracker(cap=8)
        tracker.feed(b"a" * 100 + b"\n" + b"b" * 100 + b"\n" + b"c" * 100)
        assert (tracker.count, tracker.last) == (2, b"b" * 8)

    def test_invalid_utf8_is_replaced_only_in_the_progress_text(self) -> None:
        tracker = LineTracker()
        tracker.feed(b"bad \xff\xfe \x00 end\n")
        assert tracker.last == b"bad \xff\xfe \x00 end"
        assert tracker.last_text == "bad \ufffd\ufffd \x00 end"


@pytest.mark.docker
@pytest.mark.usefixtures("no_leftovers")
def test_a_flood_of_lines_is_logged_exactly_with_bounded_memory(
    workspace: Workspace, lfs_dir: Path, stage_file, tmp_path: Path
) -> None:
    """300 MB of lines pass through lfsorch to the log: the bytes the container's sha256 saw,
    while the engine keeps only a capped copy of its own and lfsorch stays small."""
    line = "lfsorch flood line: 0123456789 abcdefghijklmnopqrstuvwxyz"
    script = _digested(f"head -c {FLOOD_BYTES} < <(yes '{line}')")
    path = stage_file("flood.yaml", "stage: flood\npackages:\n  - name: lines\n    script: |\n")
    path.write_text(path.read_text() + "".join(f"      {row}\n" for row in script.splitlines()))
    status, peak = _run_measured(
        ["run", str(path), "--lfs", str(lfs_dir), "-o", "checkpoint=none"],
        {"LFSORCH_HOME": str(workspace.root)},
        tmp_path / "cli.out",
    )
    assert status == 0, (tmp_path / "cli.out").read_text()
    ((payload, digest),) = _attempts(_log(workspace, "flood", "lines"), "flood/lines")
    assert len(payload) == FLOOD_BYTES
    assert hashlib.sha256(payload).hexdigest() == digest
    print(f"peak {peak >> 20} MiB")
    assert peak < MAX_RSS_BYTES, f"lfsorch peaked at {peak >> 20} MiB"


@pytest.mark.docker
@pytest.mark.usefixtures("no_leftovers")
def test_binary_output_of_every_attempt_is_kept_byte_for_byte(
    workspace: Workspace, lfs_dir: Path, stage_file, tmp_path: Path
) -> None:
    """Invalid UTF-8, NULs and random bytes; the first attempt fails, the retry succeeds, and
    the log holds both headers and both outputs exactly."""
    crafted = r"printf 'attempt %s: \xff\xfe \xc3\x28 \x00\x00 \r\x1b[2J\n' $LFSORCH_ATTEMPT"
    script = _digested(f"{{ {crafted}; head -c 4000000 /dev/urandom; }}")
    script += 'test "$LFSORCH_ATTEMPT" = 2\n'
    path = stage_file(
        "binary.yaml", "stage: binary\npackages:\n  - name: noise\n    retries: 1\n    script: |\n"
    )
    path.write_text(path.read_text() + "".join(f"      {row}\n" for row in script.splitlines()))
    status, _ = _run_measured(
        ["run", str(path), "--lfs", str(lfs_dir), "-o", "checkpoint=none"],
        {"LFSORCH_HOME": str(workspace.root)},
        tmp_path / "cli.out",
    )
    assert status == 0, (tmp_path / "cli.out").read_text()
    attempts = _attempts(_log(workspace, "binary", "noise"), "binary/noise")
    assert len(attempts) == 2
    for number, (payload, digest) in enumerate(attempts, start=1):
        assert payload.startswith(f"attempt {number}: ".encode() + b"\xff\xfe \xc3\x28 \x00\x00")
        assert len(payload) > 4_000_000
        assert hashlib.sha256(payload).hexdigest() == digest
