"""Package sources: a verified cache of the files the stages declare, and fetching into it.

Layout under ``Workspace.sources_dir``::

    store/sha256/<hex>     every verified file once, named by its content
    sets/<set>/<file>      per-set view: hard links into the store under the book's names;
                           this directory is what the runner mounts read-only at /sources
    sets/<set>/.lfsorch-set.json   what the view was populated for (the expected digests)
    partial/<set>/<file>.part      interrupted downloads, resumed with HTTP Range
    rejected/<set>/<file>.<sha256>.rejected   files that failed verification, never used
    apt/                   private apt state for the Debian source sets

Two source sets can carry different bytes under one name (Debian repacks some upstream
tarballs), so a name is only ever resolved inside one set's view, never across sets.

Declarations and sets are in `sourcesets`, downloading in `download`, and the apt plumbing of
the Debian sets in `debian_sources`; this module keeps the cache and fetches into it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import requests

from orchestrator.sources.archives import unsafe_reason
from orchestrator.sources.debian import AptFile, AptSources, extract_member
from orchestrator.sources.download import CHUNK, Progress, download_part, open_progress
from orchestrator.sources.errors import (
    ChecksumMismatch,
    DownloadFailed,
    SourceError,
    SourceSetError,
    SourcesNotReady,
    UnsafeArchive,
)
from orchestrator.sources.sets import UPSTREAM, DebianOrig, Source, SourceSet, load_source_set
from orchestrator.workspace import Workspace

SET_MARKER = ".lfsorch-set.json"


# --------------------------------------------------------------------------- cache layout


def cache_dir_for(workspace: Workspace, source_set: str | SourceSet) -> Path:
    """The directory of verified files for one set; the runner mounts it read-only at /sources."""
    name = source_set if isinstance(source_set, str) else source_set.name
    return cache_dir_for_root(workspace.sources_dir, name)


def cache_dir_for_root(sources_root: Path, set_name: str) -> Path:
    return sources_root / "sets" / set_name


def _store_dir(workspace_sources: Path) -> Path:
    return workspace_sources / "store" / "sha256"


def _sources_root(cache_dir: Path) -> Path:
    # cache_dir is <sources>/sets/<name>
    return cache_dir.parent.parent


def sha256_of(path: Path) -> str:
    return _digest(path, "sha256")


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _set_aside(path: Path, rejected_dir: Path, file: str, actual: str) -> Path:
    """Move a bad file where nothing reads it, keeping it for inspection."""
    rejected_dir.mkdir(parents=True, exist_ok=True)
    target = rejected_dir / f"{file}.{actual[:16]}.rejected"
    os.replace(path, target)
    return target


def _admit(verified: Path, sha256: str, root: Path, file: str, rejected_dir: Path) -> Path:
    """Move a verified file into the store once it passed the archive check; its store path.

    Nothing enters the store unchecked, so a file already there is not read again.
    """
    store = _store_dir(root)
    stored = store / sha256
    if stored.is_file():
        verified.unlink()
        return stored
    reason = unsafe_reason(verified)
    if reason is not None:
        raise UnsafeArchive(file, reason, _set_aside(verified, rejected_dir, file, sha256))
    store.mkdir(parents=True, exist_ok=True)
    os.replace(verified, stored)
    stored.chmod(0o444)
    return stored


def _place(verified: Path, sha256: str, cache_dir: Path, file: str, rejected_dir: Path) -> None:
    """Put a verified file into the store (by content) and link it into the set view."""
    stored = _admit(verified, sha256, _sources_root(cache_dir), file, rejected_dir)
    _link_into_view(stored, cache_dir / file)


def _link_into_view(stored: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.link")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(stored, tmp)
    except OSError:
        # A store on another filesystem than the view cannot be hard-linked; copy instead.
        shutil.copyfile(stored, tmp)
    os.replace(tmp, target)


@dataclass
class _Expect:
    file: str
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None
    trusted: bool = False

    @property
    def declared(self) -> bool:
        return bool(self.sha256 or self.md5)

    def check(self, path: Path) -> tuple[str, str, str] | None:
        """(algorithm, expected, actual) when the file is wrong, else None."""
        if self.sha256:
            actual = sha256_of(path)
            return None if actual == self.sha256 else ("sha256", self.sha256, actual)
        if self.md5:
            actual = _digest(path, "md5")
            return None if actual == self.md5 else ("md5", self.md5, actual)
        return None


def _write_marker(
    cache_dir: Path, source_set: SourceSet, mapped: Mapping[str, str], trusted: Mapping[str, str]
) -> None:
    """Record what the view holds: digests the set maps, and digests trusted on first use."""
    old = _read_marker(cache_dir)
    payload = {
        "name": source_set.name,
        "mapped": dict(sorted({**old.mapped, **mapped}.items())),
        "trusted": dict(sorted({**old.trusted, **trusted}.items())),
    }
    (cache_dir / SET_MARKER).write_text(json.dumps(payload, indent=1) + "\n")


@dataclass(frozen=True)
class _Marker:
    name: str | None = None
    mapped: Mapping[str, str] = field(default_factory=dict)
    trusted: Mapping[str, str] = field(default_factory=dict)


def _read_marker(cache_dir: Path) -> _Marker:
    try:
        data = json.loads((cache_dir / SET_MARKER).read_text())
        return _Marker(
            str(data["name"]),
            {str(k): str(v) for k, v in data.get("mapped", {}).items()},
            {str(k): str(v) for k, v in data.get("trusted", {}).items()},
        )
    except (ValueError, KeyError, OSError, AttributeError):
        return _Marker()


def digest_in_view(cache_dir: Path) -> Callable[[Source], str]:
    """The digest each source is verified against in this view (the set's, else the stage's,
    else one trusted on first use): what the build's /sources holds, so what its key hashes."""
    marker = _read_marker(cache_dir)

    def digest(src: Source) -> str:
        expect = _expected(src, marker.mapped, marker.trusted)
        return expect.sha256 or expect.md5 or ""

    return digest


def _expected(src: Source, mapped: Mapping[str, str], trusted: Mapping[str, str]) -> _Expect:
    """What a file must hash to: the set's digest, else the stage's, else one trusted earlier."""
    if src.file in mapped:
        return _Expect(src.file, sha256=mapped[src.file])
    if src.sha256 or src.md5:
        return _Expect(src.file, sha256=src.sha256, md5=src.md5)
    return _Expect(src.file, sha256=trusted.get(src.file), trusted=src.file in trusted)


def _expectations(
    cache_dir: Path, source_set: SourceSet | None
) -> tuple[str, dict[str, str], Mapping[str, str]]:
    marker = _read_marker(cache_dir)
    if source_set is not None:
        mapped = {f: e.sha256 for f, e in source_set.files.items()}
        return source_set.name, mapped, marker.trusted
    return marker.name or cache_dir.name, dict(marker.mapped), marker.trusted


# --------------------------------------------------------------------------- verify


SourcesArg = Iterable[Source] | Mapping[str, Iterable[Source]]


def _flatten(sources: SourcesArg) -> list[tuple[str | None, Source]]:
    if isinstance(sources, Mapping):
        return [(pkg, s) for pkg, items in sources.items() for s in items]
    return [(None, s) for s in sources]


def _unique(sources: SourcesArg) -> dict[str, tuple[list[str], Source]]:
    """One entry per file name, remembering which packages need it."""
    seen: dict[str, tuple[list[str], Source]] = {}
    for pkg, src in _flatten(sources):
        users, first = seen.setdefault(src.file, ([], src))
        if pkg:
            users.append(pkg)
        if (src.sha256, src.md5) != (first.sha256, first.md5):
            raise SourceError(
                f"{src.file} is declared twice with different checksums"
                + (f" (packages {', '.join(users)})" if users else ""),
                hint="give every declaration of one file the same sha256/md5",
            )
    return seen


def verify(
    packages_sources: SourcesArg,
    cache_dir: Path,
    source_set: SourceSet | None = None,
) -> None:
    """Check every declared file is in `cache_dir` with its expected digest; report ALL problems.

    The expected digest is the set's (when the set maps the file), else the stage's declaration.
    Without `source_set`, the set `fetch` recorded in the cache dir is used, so the runner can
    call `verify(sources, cache_dir_for(ws, name))` without loading set files.
    """
    set_name, mapped, trusted = _expectations(cache_dir, source_set)
    problems: list[str] = []
    for file, (users, src) in sorted(_unique(packages_sources).items()):
        who = f" (needed by {', '.join(sorted(set(users)))})" if users else ""
        path = cache_dir / file
        exp = _expected(src, mapped, trusted)
        if not path.is_file():
            problems.append(f"{file}: missing{who}")
        elif not exp.declared:
            problems.append(f"{file}: no checksum declared, cannot be verified{who}")
        elif (bad := exp.check(path)) is not None:
            algorithm, expected, actual = bad
            problems.append(f"{file}: {algorithm} {actual}, expected {expected}{who}")
    if problems:
        raise SourcesNotReady(problems, cache_dir, set_name)


# --------------------------------------------------------------------------- download


def _fetch_one(
    urls: Iterable[str],
    expect: _Expect,
    part: Path,
    rejected_dir: Path,
    progress: Progress,
    session: requests.Session,
    timeout: float,
) -> tuple[Path, str, str]:
    """Download from the first URL that gives the declared bytes; (verified part, sha256, url).

    `urls` is read lazily: a caller can compute further places only once the first failed.
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    mismatches: list[ChecksumMismatch] = []
    for url in urls:
        try:
            download_part(url, part, expect.file, progress, session, timeout, expect.size)
        except (requests.RequestException, OSError) as exc:
            # The part is kept: the next URL continues it (same file, checked by digest).
            failures.append(f"{url}: {_why(exc)}")
            continue
        bad = expect.check(part)
        if bad is None:
            return part, sha256_of(part), url
        algorithm, expected, actual = bad
        aside = _set_aside(part, rejected_dir, expect.file, actual)
        mismatches.append(
            ChecksumMismatch(expect.file, algorithm, expected, actual, aside, url=url)
        )
        failures.append(mismatches[-1].message)
    raise _no_good_copy(expect.file, failures, mismatches)


def _why(exc: Exception) -> str:
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code} {exc.response.reason}"
    return str(exc)


def _no_good_copy(
    file: str, failures: Sequence[str], mismatches: Sequence[ChecksumMismatch]
) -> SourceError:
    if not failures:
        return DownloadFailed(
            f"{file}: no URL declared",
            hint="add `url:` (and `mirrors:`) to the source, or use a source set that maps it",
        )
    if mismatches:
        last = mismatches[-1]
        others = [f for f in failures if last.message not in f]
        return ChecksumMismatch(
            last.file, last.algorithm, last.expected, last.actual, last.set_aside, others, last.url
        )
    return DownloadFailed(
        f"{file}: every URL failed:\n" + "\n".join(f"    {f}" for f in failures),
        hint="check the network or add a mirror; a partial download is kept and resumed",
    )


# --------------------------------------------------------------------------- fetch


@dataclass
class FetchResult:
    cache_dir: Path
    fetched: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    #: file -> the URI it came from, where the one first named failed
    fell_back: dict[str, str] = field(default_factory=dict)
    bytes_downloaded: int = 0
    seconds: float = 0.0


def fetch(
    sources: SourcesArg,
    workspace: Workspace,
    source_set: str | SourceSet = UPSTREAM,
    *,
    set_dirs: Sequence[Path] | None = None,
    progress: Progress | None = None,
    allow_unverified: bool = False,
    timeout: float = 60.0,
    session: requests.Session | None = None,
    apt: AptSources | None = None,
) -> FetchResult:
    """Make every file available, verified, in `cache_dir_for(workspace, set)`.

    Files already present with the right digest are kept; a file in the store under its digest
    is linked without downloading. A file without any checksum is refused unless
    `allow_unverified` (then its digest is recorded and later runs check against it).
    """
    the_set = (
        source_set if isinstance(source_set, SourceSet) else load_source_set(source_set, set_dirs)
    )
    fetcher = _Fetcher(
        the_set,
        workspace.sources_dir,
        session or requests.Session(),
        timeout,
        apt or AptSources(workspace.sources_dir / "apt"),
        allow_unverified,
    )
    started = time.monotonic()
    with open_progress(progress) as prog:
        for file, (_, src) in sorted(_unique(sources).items()):
            fetcher.one(file, src, prog)
    _write_marker(fetcher.cache_dir, the_set, fetcher.mapped, fetcher.newly_trusted)
    fetcher.result.seconds = time.monotonic() - started
    fetcher.raise_failures()
    return fetcher.result


class _Fetcher:
    """One `fetch` call: where files go, what they must hash to, and what happened so far."""

    def __init__(
        self,
        the_set: SourceSet,
        root: Path,
        session: requests.Session,
        timeout: float,
        apt: AptSources,
        allow_unverified: bool,
    ) -> None:
        self.the_set = the_set
        self.root = root
        self.session = session
        self.timeout = timeout
        self.apt = apt
        self.allow_unverified = allow_unverified
        self.cache_dir = cache_dir_for_root(root, the_set.name)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.rejected = root / "rejected" / the_set.name
        _, self.mapped, self.trusted = _expectations(self.cache_dir, the_set)
        self.newly_trusted: dict[str, str] = {}
        self.failures: list[SourceError] = []
        self.result = FetchResult(self.cache_dir)

    def one(self, file: str, src: Source, prog: Progress) -> None:
        exp = _expected(src, self.mapped, self.trusted)
        if not exp.declared and not self.allow_unverified:
            raise SourceError(
                f"{file}: no sha256/md5 declared, refusing to fetch it unverified",
                hint="declare a checksum, use a source set that maps this file, or "
                "pass --allow-unverified to trust the first download",
            )
        if self._have(file, exp, prog):
            self.result.cached.append(file)
            return
        try:
            part, digest, size = self._download(file, src, exp, prog)
            if not exp.declared:
                self.newly_trusted[file] = digest
                self.result.unverified.append(file)
                prog.note(f"warn {file}: no checksum declared; trusting sha256 {digest}")
            _place(part, digest, self.cache_dir, file, self.rejected)
        except SourceError as exc:
            # Keep going: one unreachable file should not hide the state of the others.
            self.failures.append(exc)
            prog.note(f"FAIL {file}: {exc.message}")
            return
        self.result.fetched.append(file)
        self.result.bytes_downloaded += size
        prog.end(file, f"sha256 {digest}")

    def _have(self, file: str, exp: _Expect, prog: Progress) -> bool:
        """Whether the view already holds the right file, or the store does and is linked."""
        have = self.cache_dir / file
        if have.is_file():
            bad = exp.check(have) if exp.declared else None
            if bad is None:
                return True
            aside = _set_aside(have, self.rejected, file, bad[2])
            prog.note(f"warn {file}: cached copy had {bad[0]} {bad[2]}; moved to {aside}")
        stored = _store_dir(self.root) / exp.sha256 if exp.sha256 else None
        if stored is not None and stored.is_file():
            _link_into_view(stored, have)
            return True
        return False

    def _download(
        self, file: str, src: Source, exp: _Expect, prog: Progress
    ) -> tuple[Path, str, int]:
        """(verified part, its sha256, bytes downloaded) for one file."""
        part = self.root / "partial" / self.the_set.name / f"{file}.part"
        entry = self.the_set.files.get(file)
        if entry is not None:
            size = self._debian(entry, file, part, prog)
            return part, entry.sha256, size
        part, digest, _ = _fetch_one(
            src.urls(), exp, part, self.rejected, prog, self.session, self.timeout
        )
        return part, digest, part.stat().st_size

    def _debian(self, entry: DebianOrig, file: str, part: Path, prog: Progress) -> int:
        """Fetch the Debian orig (verified against the signed Sources index and the set), then
        produce the build's file from it into `part`, verified. Returns the bytes downloaded."""
        orig, downloaded = self._debian_orig(entry, file, prog)
        _produce_from_orig(orig, entry, file, part, self.root)
        return downloaded

    def _debian_orig(self, entry: DebianOrig, file: str, prog: Progress) -> tuple[Path, int]:
        """The orig in the store (downloaded if not there yet), and the bytes downloaded."""
        listing = {f.name: f for f in self.apt.files(entry.package, entry.version)}
        found = listing.get(entry.orig)
        if found is None:
            which = f"{entry.package}={entry.version}" if entry.version else entry.package
            raise SourceSetError(
                f"{file}: Debian source {which} does not list {entry.orig} "
                f"(it lists {', '.join(sorted(listing)) or 'nothing'})",
                hint="the archive moved on: pin `version:` in the set file to one that has it",
            )
        if entry.orig_sha256 and found.sha256 and entry.orig_sha256 != found.sha256:
            raise SourceSetError(
                f"{entry.orig}: the archive index says sha256 {found.sha256}, the set says "
                f"{entry.orig_sha256}",
                hint="the set file is stale for this archive; update it deliberately",
            )
        orig_sha = entry.orig_sha256 or found.sha256
        if orig_sha and (_store_dir(self.root) / orig_sha).is_file():
            return _store_dir(self.root) / orig_sha, 0
        rejected = self.root / "rejected" / "debian-orig"
        orig_part = self.root / "partial" / "debian-orig" / f"{entry.orig}.part"
        exp = _Expect(entry.orig, sha256=orig_sha, size=found.size)
        urls = self._orig_urls(entry, found, orig_sha, prog)
        orig_part, digest, url = _fetch_one(
            urls, exp, orig_part, rejected, prog, self.session, self.timeout
        )
        if url != found.uri:
            self.result.fell_back[entry.orig] = url
            prog.note(f"note {entry.orig}: taken from {url}")
        downloaded = orig_part.stat().st_size
        return _admit(orig_part, digest, self.root, entry.orig, rejected), downloaded

    def _orig_urls(
        self, entry: DebianOrig, found: AptFile, orig_sha: str | None, prog: Progress
    ) -> Iterator[str]:
        """The URI apt names, then (only if that one fails) every other copy apt knows of,
        then the set's own mirrors of the orig."""
        yield found.uri
        if orig_sha is None:
            return  # without a digest no other copy could be trusted
        others = [
            *self.apt.other_copies(entry.package, entry.orig, orig_sha, found.uri),
            *entry.mirrors,
        ]
        prog.note(
            f"warn {entry.orig}: {found.uri} failed; trying {len(others)} other place(s) "
            f"the apt sources and the set list, each copy checked against sha256 {orig_sha}"
        )
        yield from others

    def raise_failures(self) -> None:
        if len(self.failures) == 1:
            raise self.failures[0]
        if self.failures:
            listing = "\n".join(f"  - {f.message}" for f in self.failures)
            ready = len(self.result.fetched) + len(self.result.cached)
            raise SourceError(
                f"{len(self.failures)} source file(s) could not be fetched:\n{listing}",
                hint=f"{ready} other file(s) are ready; "
                "fix the URLs/checksums above (or use another --set) and fetch again",
            )


# --------------------------------------------------------------------------- add


@dataclass
class AddResult:
    cache_dir: Path
    #: (local file, the names it now stands for in the set's view)
    added: list[tuple[Path, list[str]]] = field(default_factory=list)
    #: one exact reason per refused file; nothing was written for it
    refused: list[SourceError] = field(default_factory=list)


def add(
    local_files: Sequence[Path],
    sources: SourcesArg,
    workspace: Workspace,
    source_set: str | SourceSet = UPSTREAM,
    *,
    set_dirs: Sequence[Path] | None = None,
) -> AddResult:
    """Put local files into the verified cache, each under every declared name whose checksum
    (or, in a Debian set, whose orig's checksum) it matches; the air-gapped way to fill it.

    The file's content decides, not its name. A file matching nothing is refused with the
    reason, and nothing is written for it; an unsafe archive is set aside like a download.
    """
    the_set = (
        source_set if isinstance(source_set, SourceSet) else load_source_set(source_set, set_dirs)
    )
    adder = _Adder(the_set, workspace.sources_dir, sources)
    result = AddResult(adder.cache_dir)
    for path in local_files:
        try:
            result.added.append((path, adder.one(path)))
        except SourceError as exc:
            result.refused.append(exc)
    if result.added:
        _write_marker(adder.cache_dir, the_set, adder.mapped, {})
    return result


def _local_digests(path: Path) -> tuple[str, str]:
    """(sha256, md5) of a local regular file; a FIFO or device is refused before it is read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise SourceError(f"{path}: cannot be read ({exc.strerror})") from exc
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SourceError(f"{path}: not a regular file", hint="give the source file itself")
        sha, md5 = hashlib.sha256(), hashlib.md5()
        while chunk := fh.read(CHUNK):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


class _Adder:
    """One `add` call: what the given stages declare in the set, and where files go."""

    def __init__(self, the_set: SourceSet, root: Path, sources: SourcesArg) -> None:
        self.the_set = the_set
        self.root = root
        self.cache_dir = cache_dir_for_root(root, the_set.name)
        self.rejected = root / "rejected" / the_set.name
        _, self.mapped, trusted = _expectations(self.cache_dir, the_set)
        declared = _unique(sources).items()
        self.wanted = {file: _expected(src, self.mapped, trusted) for file, (_, src) in declared}

    def one(self, path: Path) -> list[str]:
        sha, md5 = _local_digests(path)
        names = [
            file
            for file, exp in self.wanted.items()
            if exp.sha256 == sha or (exp.sha256 is None and exp.md5 == md5)
        ]
        origs = [
            (file, entry)
            for file, entry in self.the_set.files.items()
            if file in self.wanted and entry.orig_sha256 == sha and file not in names
        ]
        if not names and not origs:
            raise SourceError(self._no_match(path, sha, md5), hint=self._hint())
        stored = self._copy_in(path, sha, names[0] if names else origs[0][1].orig)
        for file in names:
            _link_into_view(stored, self.cache_dir / file)
        for file, entry in origs:
            self._from_orig(stored, file, entry)
        return sorted([*names, *(file for file, _ in origs)])

    def _no_match(self, path: Path, sha: str, md5: str) -> str:
        exp = self.wanted.get(path.name)
        if exp is not None and exp.declared:
            algorithm, declared, actual = (
                ("sha256", exp.sha256, sha) if exp.sha256 else ("md5", exp.md5, md5)
            )
            return (
                f"{path}: {algorithm} {actual} is not the declared {algorithm} {declared} "
                f"of {path.name}"
            )
        orig = next((e for e in self.the_set.files.values() if e.orig == path.name), None)
        if orig is not None and orig.orig_sha256:
            return (
                f"{path}: sha256 {sha} is not the sha256 {orig.orig_sha256} that set "
                f"{self.the_set.name} declares for the Debian orig {orig.orig}"
            )
        return (
            f"{path}: sha256 {sha} matches no source of the given stage files "
            f"(set {self.the_set.name})"
        )

    def _hint(self) -> str:
        return (
            f"`lfsorch sources list STAGE.yaml --set {self.the_set.name}` shows the files the "
            "stages need; a file is taken only when its checksum is the declared one"
        )

    def _copy_in(self, path: Path, sha: str, file: str) -> Path:
        """Copy the file into the store, checking the copy is the bytes that were matched."""
        stored = _store_dir(self.root) / sha
        if stored.is_file():
            return stored
        part = self.root / "partial" / "add" / f"{sha}.part"
        part.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, part)
        if sha256_of(part) != sha:
            part.unlink()
            raise SourceError(f"{path}: changed while it was being added; nothing was written")
        return _admit(part, sha, self.root, file, self.rejected)

    def _from_orig(self, orig: Path, file: str, entry: DebianOrig) -> None:
        part = self.root / "partial" / self.the_set.name / f"{file}.part"
        _produce_from_orig(orig, entry, file, part, self.root)
        _place(part, entry.sha256, self.cache_dir, file, self.rejected)


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class SourceStatus:
    file: str
    state: Literal["ok", "missing", "bad", "unverified"]
    detail: str = ""


def status(
    sources: SourcesArg, cache_dir: Path, source_set: SourceSet | None = None
) -> list[SourceStatus]:
    """Per-file state of the cache, for `lfsorch sources list`."""
    _, mapped, trusted = _expectations(cache_dir, source_set)
    out = []
    for file, (_, src) in sorted(_unique(sources).items()):
        exp = _expected(src, mapped, trusted)
        path = cache_dir / file
        if not path.is_file():
            out.append(SourceStatus(file, "missing"))
        elif not exp.declared:
            out.append(SourceStatus(file, "unverified", "no checksum declared"))
        elif (bad := exp.check(path)) is not None:
            out.append(SourceStatus(file, "bad", f"{bad[0]} {bad[2]}, expected {bad[1]}"))
        else:
            note = ", trusted on first fetch" if exp.trusted else ""
            out.append(SourceStatus(file, "ok", f"{path.stat().st_size} bytes{note}"))
    return out


def _produce_from_orig(orig: Path, entry: DebianOrig, file: str, part: Path, root: Path) -> None:
    """The build's file from a Debian orig (the orig itself, or the member it wraps) into
    `part`, verified against the set; a wrong one is set aside under `root` and refused."""
    part.parent.mkdir(parents=True, exist_ok=True)
    if entry.member:
        extract_member(orig, entry.member, part)
    else:
        shutil.copyfile(orig, part)
    bad = _Expect(file, sha256=entry.sha256).check(part)
    if bad is not None:
        aside = _set_aside(part, root / "rejected" / "debian", file, bad[2])
        raise ChecksumMismatch(file, *bad, aside)
