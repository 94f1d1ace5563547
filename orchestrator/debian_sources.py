"""The Debian route to source files: apt's view of Debian source packages, and their origs.

A private apt setup, derived from the machine's own `deb` entries, answers
`apt-get source --print-uris`; the orig tarball it names is verified against the signed
Sources index, and may wrap the tarball the build uses (`extract_member`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator import aptsources
from orchestrator.download import CHUNK
from orchestrator.source_errors import SourceSetError


def derive_src_sources(etc_apt: Path = aptsources.ETC_APT) -> tuple[str, str]:
    """(deb822 text, one-line text) of deb-src entries mirroring the machine's deb entries."""
    entries = aptsources.read_entries(etc_apt)
    return aptsources.src_deb822(entries), aptsources.src_one_line(entries)


@dataclass(frozen=True)
class AptFile:
    uri: str
    name: str
    size: int
    sha256: str | None


_PRINT_URI = re.compile(r"^'(?P<uri>[^']+)' (?P<name>\S+) (?P<size>\d+) (?P<hash>\S+)")


def parse_print_uris(output: str) -> list[AptFile]:
    files = []
    for ln in output.splitlines():
        m = _PRINT_URI.match(ln)
        if not m:
            continue
        algo, _, value = m["hash"].partition(":")
        files.append(
            AptFile(
                m["uri"], m["name"], int(m["size"]), value if algo.upper() == "SHA256" else None
            )
        )
    return files


@dataclass
class AptSources:
    """A private apt setup answering `apt-get source --print-uris` with deb-src entries derived
    from the machine's own sources; the system's apt config and lists are left untouched."""

    root: Path
    etc_apt: Path = Path("/etc/apt")
    runner: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run
    _ready: bool = field(default=False, init=False)

    def _options(self) -> list[str]:
        r = self.root
        return [
            "-o", f"Dir::State::Lists={r / 'lists'}",
            "-o", f"Dir::Etc::SourceList={r / 'sources.list'}",
            "-o", f"Dir::Etc::SourceParts={r / 'sources.list.d'}",
            "-o", f"Dir::Cache={r / 'cache'}",
            "-o", "Dir::Cache::pkgcache=",
            "-o", "Dir::Cache::srcpkgcache=",
            "-o", "APT::Get::List-Cleanup=false",
        ]  # fmt: skip

    def prepare(self) -> None:
        if self._ready:
            return
        deb822, oneline = derive_src_sources(self.etc_apt)
        if not deb822 and not oneline:
            raise SourceSetError(
                f"no `deb` entries in {self.etc_apt}: cannot derive deb-src entries",
                hint="a Debian source set needs a Debian machine with working apt sources",
            )
        (self.root / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (self.root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        parts = self.root / "sources.list.d"
        parts.mkdir(parents=True, exist_ok=True)
        (self.root / "sources.list").write_text(oneline)
        (parts / "lfsorch-src.sources").write_text(deb822)
        self._run(["apt-get", *self._options(), "update"], "apt-get update (deb-src)")
        self._ready = True

    def _run(self, argv: list[str], what: str, cwd: Path | None = None) -> str:
        try:
            done = self.runner(argv, capture_output=True, text=True, cwd=cwd, check=False)
        except FileNotFoundError as exc:
            raise SourceSetError(f"{what}: {exc}", hint="install apt (Debian host)") from exc
        if done.returncode != 0:
            raise SourceSetError(f"{what} failed ({done.returncode}):\n{done.stderr.strip()}")
        return done.stdout

    def files(self, package: str, version: str | None = None) -> list[AptFile]:
        self.prepare()
        spec = f"{package}={version}" if version else package
        with tempfile.TemporaryDirectory(prefix="lfsorch-apt-") as scratch:
            out = self._run(
                ["apt-get", *self._options(), "source", "--print-uris", "--download-only", spec],
                f"apt-get source --print-uris {spec}",
                cwd=Path(scratch),
            )
        return parse_print_uris(out)


def extract_member(orig: Path, member: str, dest: Path) -> None:
    """Copy the tarball `member` (path or basename) out of `orig` into `dest`."""
    with tarfile.open(orig) as tar:
        for info in tar:
            if info.isfile() and (info.name == member or Path(info.name).name == member):
                src = tar.extractfile(info)
                assert src is not None
                with src, dest.open("wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
                return
    raise SourceSetError(f"{orig.name} has no member {member!r}", hint="fix `member:` in the set")
