"""Build output reaches the log file byte for byte, every attempt kept, with bounded memory."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator import cli
from orchestrator.build.state import Attempt, PackageState, RunState
from orchestrator.execution import container as runner
from orchestrator.execution.container import PROGRESS_LINE_MAX_BYTES, LineTracker, _LogPump
from orchestrator.monitor import console as console_module
from orchestrator.monitor.console import ConsoleView, printable
from orchestrator.monitor.events import BuildProgress, BuildStart
from orchestrator.workspace import Workspace
from tests.helpers import start_cli

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
        process = start_cli(*args, env=env, stdout=sink)
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


class _Output:
    """What the engine's attach stream yields, and how far it was read."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = iter(chunks)
        self.read = 0
        self.closed = False

    def __iter__(self) -> _Output:
        return self

    def __next__(self) -> bytes:
        chunk = next(self._chunks)
        self.read += 1
        return chunk

    def close(self) -> None:
        self.closed = True


class _Stalled(_Output):
    """Yields its chunks, then is silent until `release` is set or the reader closes it."""

    def __init__(self, chunks: list[bytes]) -> None:
        super().__init__(chunks)
        self.release = threading.Event()

    def __next__(self) -> bytes:
        with contextlib.suppress(StopIteration):
            return super().__next__()
        self.release.wait()
        raise StopIteration

    def close(self) -> None:
        super().close()
        self.release.set()


class TestLogPump:
    """An unread stream holds the container back, so the pump reads to the end whatever fails."""

    def _pump(self, chunks: list[bytes], path: Path, on_line) -> tuple[_LogPump, _Output]:
        output = _Output(chunks)
        pump = _LogPump(output, path, "test", on_line)  # type: ignore[arg-type]
        pump.start()
        pump.finish()
        return pump, output

    def test_a_failing_subscriber_does_not_stop_the_log(self, tmp_path: Path) -> None:
        def broken(line: str, count: int) -> None:
            raise RuntimeError("subscriber bug")

        chunks = [b"line %d\n" % n for n in range(1000)]
        pump, output = self._pump(chunks, tmp_path / "log", broken)
        assert output.read == 1000
        assert (tmp_path / "log").read_bytes() == b"".join(chunks)
        assert (pump.lines.count, pump.failure) == (1000, None)

    def test_a_stream_that_never_ends_is_closed_and_the_log_says_so(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(runner, "_STREAM_SILENCE_S", 1.0)
        output = _Stalled([b"all there was\n"])
        pump = _LogPump(output, tmp_path / "log", "test", lambda line, count: None)  # type: ignore[arg-type]
        pump.start()
        pump.finish()
        assert output.closed
        assert (tmp_path / "log").read_bytes() == (
            b"all there was\n\nlfsorch: the output stream was silent 1s after the container "
            b"exited; the log may be incomplete\n"
        )

    def test_silence_before_the_exit_does_not_cut_the_stream_short(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A build quiet for longer than the grace (a long compile) whose last bytes arrive
        shortly after the exit keeps them."""
        monkeypatch.setattr(runner, "_STREAM_SILENCE_S", 3.0)
        output = _Stalled([b"configure done\n"])
        pump = _LogPump(output, tmp_path / "log", "test", lambda line, count: None)  # type: ignore[arg-type]
        pump.start()
        time.sleep(4.0)  # silent past the grace while the container still runs
        threading.Timer(1.5, output.release.set).start()  # the stream ends after the exit
        pump.finish()
        assert (pump.failure, output.closed) == (None, False)
        assert (tmp_path / "log").read_bytes() == b"configure done\n"

    def test_an_unwritable_log_is_reported_and_the_stream_still_drained(
        self, tmp_path: Path
    ) -> None:
        (tmp_path / "log").mkdir()
        pump, output = self._pump([b"x\n"] * 50, tmp_path / "log", lambda line, count: None)
        assert output.read == 50
        assert pump.failure is not None
        assert pump.failure.startswith("lfsorch: the log could not be written: [Errno 21]")
        assert list((tmp_path / "log").iterdir()) == []


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


# Clear the screen, set the clipboard (OSC 52, BEL- and ST-terminated), retitle the window,
# ring the bell, 8-bit CSI, and a right-to-left override.
HOSTILE = (
    "cc: error\x1b[2J\x1b[H"
    "\x1b]52;c;cm0gLXJmIH4K\x07"
    "\x1b]52;p;cm0gLXJmIH4K\x1b\\"
    "\x1b]0;owned\x07\x07\x9b31m\u202eevil"
)
HOSTILE_SHOWN = (
    r"cc: error\x1b[2J\x1b[H\x1b]52;c;cm0gLXJmIH4K\x07\x1b]52;p;cm0gLXJmIH4K\x1b"
    "\\"  # the string terminator's own backslash is printable
    r"\x1b]0;owned\x07\x07\x9b31m\u202eevil"
)
RAW_CONTROLS = ("\x1b[2J", "\x1b]52", "\x1b]0;", "\x07", "\x9b", "\u202e")


class TestTerminalEscapes:
    def test_controls_are_shown_as_escapes_but_tab_and_newline(self) -> None:
        assert printable(HOSTILE) == HOSTILE_SHOWN
        assert printable("make[1]:\tok\n") == "make[1]:\tok\n"
        assert printable("\x00\x7f\x1f") == r"\x00\x7f\x1f"

    def test_failure_tail_shows_no_raw_control_on_a_terminal(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        log = tmp_path / "p.log"
        log.write_bytes(b"=== lfsorch: s/p attempt 1 ===\n" + HOSTILE.encode() + b"\nlast\n")
        package = PackageState(stage="s", name="p", status="failed", log=str(log))
        package.attempts.append(Attempt(number=1, started="t", error="exit status 2\x1b[2J"))
        state = RunState(run_id="r", lfs="/x", files=[], outcome="failed", packages=[package])
        for terminal in (True, False):
            buffer = io.StringIO()
            console = Console(file=buffer, force_terminal=terminal, highlight=False, width=400)
            monkeypatch.setattr(cli, "out", console)
            cli._print_summary(state, 5)
            text = buffer.getvalue()
            assert f"  | {HOSTILE_SHOWN}\n" in text
            assert r"FAILED s/p: exit status 2\x1b[2J" in text
            assert not any(control in text for control in RAW_CONTROLS)
        assert HOSTILE.encode() in log.read_bytes()

    @pytest.mark.parametrize("live", [True, False])
    def test_progress_lines_show_no_raw_control(
        self, live: bool, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(console_module, "_HEARTBEAT_S", 0.0)  # plain mode: every line
        buffer = io.StringIO()
        console = Console(file=buffer, force_terminal=live, width=400)
        with ConsoleView(console, live=live) as view:
            view(BuildStart(run_id="", stage="s", package="p", attempt=1, log=""))
            for line in (HOSTILE, "[/usr/lib]"):
                view(BuildProgress(run_id="", stage="s", package="p", line=line, lines=1))
                if view._progress is not None:
                    view._progress.refresh()
        text = buffer.getvalue()
        assert r"cc: error\x1b[2J\x1b[H\x1b]52;c;" in text
        assert "[/usr/lib]" in text
        assert not any(control in text for control in RAW_CONTROLS)
