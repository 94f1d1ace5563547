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
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import requests

from orchestrator.debian_sources import AptSources, extract_member
from orchestrator.download import CHUNK, Progress, download_part, open_progress
from orchestrator.source_errors import (
    ChecksumMismatch,
    DownloadFailed,
    SourceError,
    SourceSetError,
    SourcesNotReady,
)
from orchestrator.sourcesets import UPSTREAM, DebianOrig, Source, SourceSet, load_source_set
from orchestrator.workspace import Workspace

SET_MARKER = ".lfsorch-set.json"


# --------------------------------------------------------------------------- cache layout


def cache_dir_for(workspace: Workspace, source_set: str | SourceSet) -> Path:
    """The directory of verified files for one set; the runner mounts it read-only at /sources."""
    name = source_set if isinstance(source_set, str) else source_set.name
    return workspace.sources_dir / "sets" / name


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


def _place(verified: Path, sha256: str, cache_dir: Path, file: str) -> None:
    """Put a verified file into the store (by content) and link it into the set view."""
    store = _store_dir(_sources_root(cache_dir))
    store.mkdir(parents=True, exist_ok=True)
    stored = store / sha256
    if stored.exists():
        verified.unlink()
    else:
        os.replace(verified, stored)
        stored.chmod(0o444)
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
    urls: Sequence[str],
    expect: _Expect,
    part: Path,
    rejected_dir: Path,
    progress: Progress,
    session: requests.Session,
    timeout: float,
) -> tuple[Path, str, bool]:
    """Download with mirror fallback; returns (verified part, sha256, resumed)."""
    if not urls:
        raise DownloadFailed(
            f"{expect.file}: no URL declared",
            hint="add `url:` (and `mirrors:`) to the source, or use a source set that maps it",
        )
    part.parent.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    mismatch: ChecksumMismatch | None = None
    for url in urls:
        try:
            resumed = download_part(url, part, expect.file, progress, session, timeout, expect.size)
        except (requests.RequestException, OSError) as exc:
            # The part is kept: the next mirror continues it (same file, checked by digest).
            failures.append(f"{url}: {exc}")
            continue
        bad = expect.check(part)
        if bad is None:
            return part, sha256_of(part), resumed
        algorithm, expected, actual = bad
        aside = _set_aside(part, rejected_dir, expect.file, actual)
        mismatch = ChecksumMismatch(expect.file, algorithm, expected, actual, aside)
        failures.append(f"{url}: {mismatch.message}")
    if mismatch is not None and len(urls) == 1:
        raise mismatch
    if mismatch is not None:
        raise ChecksumMismatch(
            mismatch.file,
            mismatch.algorithm,
            mismatch.expected,
            mismatch.actual,
            mismatch.set_aside,
        ) from DownloadFailed("; ".join(failures))
    raise DownloadFailed(
        f"{expect.file}: every URL failed:\n" + "\n".join(f"    {f}" for f in failures),
        hint="check the network or add a mirror; a partial download is kept and resumed",
    )


# --------------------------------------------------------------------------- fetch


@dataclass
class FetchResult:
    cache_dir: Path
    fetched: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
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
    cache_dir = cache_dir_for(workspace, the_set)
    root = workspace.sources_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    result = FetchResult(cache_dir)
    started = time.monotonic()
    sess = session or requests.Session()
    apt_sources = apt or AptSources(root / "apt")
    _, mapped, trusted = _expectations(cache_dir, the_set)
    newly_trusted: dict[str, str] = {}
    failures: list[SourceError] = []
    rejected = root / "rejected" / the_set.name
    with open_progress(progress) as prog:
        for file, (_, src) in sorted(_unique(sources).items()):
            exp = _expected(src, mapped, trusted)
            if not exp.declared and not allow_unverified:
                raise SourceError(
                    f"{file}: no sha256/md5 declared, refusing to fetch it unverified",
                    hint="declare a checksum, use a source set that maps this file, or "
                    "pass --allow-unverified to trust the first download",
                )
            have = cache_dir / file
            if have.is_file():
                bad = exp.check(have) if exp.declared else None
                if bad is None:
                    result.cached.append(file)
                    continue
                aside = _set_aside(have, rejected, file, bad[2])
                prog.note(f"warn {file}: cached copy had {bad[0]} {bad[2]}; moved to {aside}")
            if exp.sha256 and (_store_dir(root) / exp.sha256).is_file():
                _link_into_view(_store_dir(root) / exp.sha256, have)
                result.cached.append(file)
                continue
            part = root / "partial" / the_set.name / f"{file}.part"
            entry = the_set.files.get(file)
            try:
                if entry is not None:
                    size = _fetch_debian(entry, file, root, part, apt_sources, prog, sess, timeout)
                    digest = entry.sha256
                else:
                    part, digest, _ = _fetch_one(
                        src.urls(), exp, part, rejected, prog, sess, timeout
                    )
                    size = part.stat().st_size
            except SourceError as exc:
                # Keep going: one unreachable file should not hide the state of the others.
                failures.append(exc)
                prog.note(f"FAIL {file}: {exc.message}")
                continue
            if not exp.declared:
                newly_trusted[file] = digest
                result.unverified.append(file)
                prog.note(f"warn {file}: no checksum declared; trusting sha256 {digest}")
            _place(part, digest, cache_dir, file)
            result.fetched.append(file)
            result.bytes_downloaded += size
            prog.end(file, f"sha256 {digest}")
    _write_marker(cache_dir, the_set, mapped, newly_trusted)
    result.seconds = time.monotonic() - started
    if len(failures) == 1:
        raise failures[0]
    if failures:
        listing = "\n".join(f"  - {f.message}" for f in failures)
        raise SourceError(
            f"{len(failures)} source file(s) could not be fetched:\n{listing}",
            hint=f"{len(result.fetched) + len(result.cached)} other file(s) are ready; "
            "fix the URLs/checksums above (or use another --set) and fetch again",
        )
    return result


def _fetch_debian(
    entry: DebianOrig,
    file: str,
    root: Path,
    part: Path,
    apt: AptSources,
    prog: Progress,
    session: requests.Session,
    timeout: float,
) -> int:
    """Fetch the Debian orig (verified against the signed Sources index and the set), then
    produce the build's file from it into `part`, verified. Returns the bytes downloaded."""
    listing = {f.name: f for f in apt.files(entry.package, entry.version)}
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
    rejected = root / "rejected" / "debian-orig"
    store = _store_dir(root)
    orig_sha = entry.orig_sha256 or found.sha256
    downloaded = 0
    if orig_sha and (store / orig_sha).is_file():
        orig = store / orig_sha
    else:
        orig_part = root / "partial" / "debian-orig" / f"{entry.orig}.part"
        exp = _Expect(entry.orig, sha256=orig_sha, size=found.size)
        orig_part, digest, _ = _fetch_one(
            [found.uri], exp, orig_part, rejected, prog, session, timeout
        )
        downloaded = orig_part.stat().st_size
        store.mkdir(parents=True, exist_ok=True)
        orig = store / digest
        os.replace(orig_part, orig)
        orig.chmod(0o444)
    part.parent.mkdir(parents=True, exist_ok=True)
    if entry.member:
        extract_member(orig, entry.member, part)
    else:
        shutil.copyfile(orig, part)
    bad = _Expect(file, sha256=entry.sha256).check(part)
    if bad is not None:
        algorithm, expected, actual = bad
        aside = _set_aside(part, root / "rejected" / "debian", file, actual)
        raise ChecksumMismatch(file, algorithm, expected, actual, aside)
    return downloaded


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
