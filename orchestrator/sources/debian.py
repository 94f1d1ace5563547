"""The Debian route to source files: apt's view of Debian source packages, and their origs.

A private apt setup, derived from the machine's own `deb` entries, answers
`apt-get source --print-uris`; the orig tarball it names is verified against the signed
Sources index, and may wrap the tarball the build uses (`extract_member`).

apt names one URI per file, in the archive of the candidate version. An archive can list a
version without carrying its orig (a security update reuses the main archive's orig), so
`other_copies` lists every place the machine's apt sources offer the same file name with the
same digest; the caller accepts a copy only when its bytes hash to that digest.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.sources import aptsources
from orchestrator.sources.download import CHUNK
from orchestrator.sources.errors import SourceSetError


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


@dataclass(frozen=True)
class SourceStanza:
    """One version of a source package as an apt Sources index lists it."""

    version: str
    directory: str
    #: file name -> sha256, from `Checksums-Sha256`
    sha256: dict[str, str]


def parse_showsrc(output: str) -> list[SourceStanza]:
    """The stanzas of `apt-cache showsrc` output, in the order apt prints them."""
    found = []
    for fields in aptsources.stanzas(output):
        by_name = {name.lower(): value for name, value in fields}
        digests = {}
        for line in by_name.get("checksums-sha256", "").splitlines():
            words = line.split()
            if len(words) == 3:
                digests[words[2]] = words[0].lower()
        if "version" in by_name and "directory" in by_name:
            found.append(SourceStanza(by_name["version"], by_name["directory"], digests))
    return found


def _same_file(uri: str) -> str:
    # apt writes `+` as `%2b`, urllib as `%2B`: compare the decoded form.
    return urllib.parse.unquote(uri)


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

    def _files_or_none(self, package: str, version: str) -> list[AptFile]:
        try:
            return self.files(package, version)
        except SourceSetError:
            return []

    def stanzas(self, package: str) -> list[SourceStanza]:
        """Every version of source package `package` the indexes list (none if unknown)."""
        self.prepare()
        argv = ["apt-cache", *self._options(), "showsrc", "--only-source", package]
        try:
            return parse_showsrc(self._run(argv, f"apt-cache showsrc {package}"))
        except SourceSetError:
            return []

    def archive_uris(self) -> list[str]:
        """The base URI of every archive the machine's apt sources name, in apt's order."""
        pairs = aptsources.deb_pairs(aptsources.read_entries(self.etc_apt))
        uris = [uri for uri, _ in pairs if urllib.parse.urlsplit(uri).scheme in ("http", "https")]
        return list(dict.fromkeys(uris))

    def other_copies(
        self, package: str, name: str, sha256: str | None, named_uri: str
    ) -> list[str]:
        """Every URI but `named_uri` where the apt sources may offer `name` with `sha256`:
        first where apt puts each other version listing it, then that version's pool directory
        under every archive (an archive's index may name a file another archive holds)."""
        versions = [
            s
            for s in self.stanzas(package)
            if name in s.sha256 and (sha256 is None or s.sha256[name] == sha256)
        ]
        uris = [
            f.uri
            for stanza in versions
            for f in self._files_or_none(package, stanza.version)
            if f.name == name
        ]
        quoted = urllib.parse.quote(name)
        directories = dict.fromkeys(s.directory.strip("/") for s in versions)
        uris += [f"{base}/{d}/{quoted}" for d in directories for base in self.archive_uris()]
        seen = {_same_file(named_uri)}
        unique = []
        for uri in uris:
            if _same_file(uri) not in seen:
                seen.add(_same_file(uri))
                unique.append(uri)
        return unique


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
