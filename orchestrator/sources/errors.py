"""The errors about source files: missing, mismatched, undownloadable, badly declared."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from orchestrator.errors import ExitCode, LfsorchError


class SourceError(LfsorchError):
    """Base of the errors about source files."""

    exit_code = ExitCode.SOURCES


class ChecksumMismatch(SourceError):
    """A file's digest is not the declared one. The file has been set aside, never used."""

    def __init__(
        self,
        file: str,
        algorithm: str,
        expected: str,
        actual: str,
        set_aside: Path | None,
        other_failures: Sequence[str] = (),
        url: str | None = None,
    ) -> None:
        where = f"; the bad copy was moved to {set_aside}" if set_aside else ""
        origin = f" from {url}" if url else ""
        also = "".join(f"\n    also tried {f}" for f in other_failures)
        super().__init__(
            f"checksum mismatch for {file}{origin}: expected {algorithm} {expected}, "
            f"got {actual}{where}{also}",
            hint="the server sent other bytes than declared; check the URL and the checksum in "
            "the stage or source-set file, then fetch again",
        )
        self.file = file
        self.algorithm = algorithm
        self.expected = expected
        self.actual = actual
        self.set_aside = set_aside
        self.url = url


class UnsafeArchive(SourceError):
    """A source archive would write outside its directory when unpacked. Set aside, never used."""

    def __init__(self, file: str, reason: str, set_aside: Path | None) -> None:
        where = f"; it was moved to {set_aside}" if set_aside else "; nothing was written"
        super().__init__(
            f"{file} is not safe to unpack: {reason}{where}",
            hint="its checksum matches the declaration, so the declared file itself is unsafe; "
            "check where the declaration came from before using it",
        )
        self.file = file
        self.reason = reason
        self.set_aside = set_aside


class DownloadFailed(SourceError):
    """No URL of a file could be downloaded."""


class SourcesNotReady(SourceError):
    """Files a run needs are missing or wrong in the cache."""

    def __init__(self, problems: Sequence[str], cache_dir: Path, set_name: str) -> None:
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"{len(problems)} source file(s) not ready in {cache_dir} (set {set_name}):\n{listing}",
            hint=f"run `lfsorch sources fetch STAGE.yaml --set {set_name}`",
        )
        self.problems = list(problems)


class SourceSetError(SourceError):
    """A source-set file is missing or malformed, or apt cannot resolve it."""

    exit_code = ExitCode.USER_ERROR
