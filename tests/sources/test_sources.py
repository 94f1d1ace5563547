"""Source cache: verification, fetching (resume, mirrors, checksum), Debian set plumbing."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from orchestrator.sources.cache import cache_dir_for, fetch, status, verify
from orchestrator.sources.debian import AptFile, AptSources, derive_src_sources, parse_print_uris
from orchestrator.sources.download import PlainProgress
from orchestrator.sources.errors import (
    ChecksumMismatch,
    DownloadFailed,
    SourceError,
    SourcesNotReady,
)
from orchestrator.sources.sets import DebianOrig, Source, SourceSet, load_source_set
from orchestrator.workspace import Workspace
from tests.helpers import loopback_http
from tests.samples import DEB822, DEB822_SRC

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, not all-same bytes so offsets matter
OTHER = b"another file\n" * 1000


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Served:
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    base: str = ""


@pytest.fixture
def server() -> Iterator[Served]:
    served = Served()

    def get(handler: BaseHTTPRequestHandler) -> None:
        rng = handler.headers.get("Range")
        served.requests.append((handler.path, rng))
        data = served.files.get(handler.path)
        if data is None:
            handler.send_error(404)
            return
        start = 0
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            assert m, rng
            start = int(m[1])
            if start >= len(data):
                handler.send_response(416)
                handler.end_headers()
                return
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            handler.send_response(200)
        handler.send_header("Content-Length", str(len(data) - start))
        handler.end_headers()
        handler.wfile.write(data[start:])

    with loopback_http(get) as base:
        served.base = base
        yield served


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "home")


def quiet() -> PlainProgress:
    return PlainProgress(io.StringIO())


# --------------------------------------------------------------------------- verify


def test_verify_lists_every_missing_and_wrong_file_at_once(tmp_path: Path) -> None:
    cache = tmp_path / "sets" / "upstream"
    cache.mkdir(parents=True)
    (cache / "good.tar.xz").write_bytes(PAYLOAD)
    (cache / "bad.tar.xz").write_bytes(b"tampered")
    sources = {
        "pkg-a": [Source(file="good.tar.xz", sha256=sha(PAYLOAD))],
        "pkg-b": [
            Source(file="bad.tar.xz", sha256=sha(OTHER)),
            Source(file="gone.tar.xz", sha256=sha(OTHER)),
        ],
    }
    with pytest.raises(SourcesNotReady) as err:
        verify(sources, cache)
    problems = err.value.problems
    assert len(problems) == 2
    assert problems[0] == (
        f"bad.tar.xz: sha256 {sha(b'tampered')}, expected {sha(OTHER)} (needed by pkg-b)"
    )
    assert problems[1] == "gone.tar.xz: missing (needed by pkg-b)"
    assert "lfsorch sources fetch" in str(err.value)


def test_verify_passes_when_all_files_match(tmp_path: Path) -> None:
    (tmp_path / "a.tar.gz").write_bytes(PAYLOAD)
    verify([Source(file="a.tar.gz", sha256=sha(PAYLOAD))], tmp_path)


def test_verify_checks_md5_when_no_sha256(tmp_path: Path) -> None:
    (tmp_path / "a.tar.gz").write_bytes(PAYLOAD)
    verify([Source(file="a.tar.gz", md5=hashlib.md5(PAYLOAD).hexdigest())], tmp_path)
    with pytest.raises(SourcesNotReady, match="md5"):
        verify([Source(file="a.tar.gz", md5="0" * 32)], tmp_path)


# --------------------------------------------------------------------------- fetch


def test_fetch_places_verified_file_in_set_view(server: Served, ws: Workspace) -> None:
    server.files["/a.tar.xz"] = PAYLOAD
    src = Source(file="a.tar.xz", url=f"{server.base}/a.tar.xz", sha256=sha(PAYLOAD))
    result = fetch([src], ws, progress=quiet())
    cache = cache_dir_for(ws, "upstream")
    assert result.fetched == ["a.tar.xz"]
    assert (cache / "a.tar.xz").read_bytes() == PAYLOAD
    verify([src], cache)
    # A second fetch finds it and downloads nothing.
    server.requests.clear()
    again = fetch([src], ws, progress=quiet())
    assert again.cached == ["a.tar.xz"] and server.requests == []


def test_checksum_mismatch_sets_bad_file_aside_and_harms_nothing_else(
    server: Served, ws: Workspace
) -> None:
    server.files["/good.tar.xz"] = OTHER
    server.files["/a.tar.xz"] = b"not what was declared"
    good = Source(file="good.tar.xz", url=f"{server.base}/good.tar.xz", sha256=sha(OTHER))
    fetch([good], ws, progress=quiet())
    bad = Source(file="a.tar.xz", url=f"{server.base}/a.tar.xz", sha256=sha(PAYLOAD))

    with pytest.raises(ChecksumMismatch) as err:
        fetch([bad], ws, progress=quiet())

    actual = sha(b"not what was declared")
    exc = err.value
    assert (exc.file, exc.expected, exc.actual) == ("a.tar.xz", sha(PAYLOAD), actual)
    assert exc.set_aside is not None and exc.set_aside.read_bytes() == b"not what was declared"
    assert exc.set_aside.name.endswith(".rejected")
    assert exc.message == (
        f"checksum mismatch for a.tar.xz from {server.base}/a.tar.xz: "
        f"expected sha256 {sha(PAYLOAD)}, got {actual}; "
        f"the bad copy was moved to {exc.set_aside}"
    )
    cache = cache_dir_for(ws, "upstream")
    assert not (cache / "a.tar.xz").exists()
    assert exc.set_aside.parent != cache  # never visible in /sources
    assert (cache / "good.tar.xz").read_bytes() == OTHER
    verify([good], cache)


def test_partial_download_is_resumed_with_range(server: Served, ws: Workspace) -> None:
    server.files["/big.tar.xz"] = PAYLOAD
    part = ws.sources_dir / "partial" / "upstream" / "big.tar.xz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD[:300_000])
    src = Source(file="big.tar.xz", url=f"{server.base}/big.tar.xz", sha256=sha(PAYLOAD))

    fetch([src], ws, progress=quiet())

    assert server.requests == [("/big.tar.xz", "bytes=300000-")]
    got = (cache_dir_for(ws, "upstream") / "big.tar.xz").read_bytes()
    assert sha(got) == sha(PAYLOAD)
    assert not part.exists()


def test_mirror_fallback_in_order(server: Served, ws: Workspace) -> None:
    server.files["/mirror2/a.tar.gz"] = PAYLOAD
    src = Source(
        file="a.tar.gz",
        url=f"{server.base}/gone/a.tar.gz",
        mirrors=[f"{server.base}/also-gone/a.tar.gz", f"{server.base}/mirror2/a.tar.gz"],
        sha256=sha(PAYLOAD),
    )
    fetch([src], ws, progress=quiet())
    assert [p for p, _ in server.requests] == [
        "/gone/a.tar.gz",
        "/also-gone/a.tar.gz",
        "/mirror2/a.tar.gz",
    ]
    assert (cache_dir_for(ws, "upstream") / "a.tar.gz").read_bytes() == PAYLOAD


def test_all_mirrors_failing_names_every_url(server: Served, ws: Workspace) -> None:
    src = Source(
        file="a.tar.gz", url=f"{server.base}/x", mirrors=[f"{server.base}/y"], sha256=sha(OTHER)
    )
    with pytest.raises(DownloadFailed) as err:
        fetch([src], ws, progress=quiet())
    assert f"{server.base}/x" in str(err.value) and f"{server.base}/y" in str(err.value)


def test_unverified_source_is_refused_unless_allowed(server: Served, ws: Workspace) -> None:
    server.files["/a.tar.xz"] = PAYLOAD
    src = Source(file="a.tar.xz", url=f"{server.base}/a.tar.xz")
    with pytest.raises(SourceError, match="no sha256/md5 declared"):
        fetch([src], ws, progress=quiet())
    result = fetch([src], ws, progress=quiet(), allow_unverified=True)
    assert result.unverified == ["a.tar.xz"]
    cache = cache_dir_for(ws, "upstream")
    verify([src], cache)  # checked against the digest recorded on first use
    (cache / "a.tar.xz").unlink()
    (cache / "a.tar.xz").write_bytes(b"changed later")
    with pytest.raises(SourcesNotReady, match="expected " + sha(PAYLOAD)):
        verify([src], cache)


def test_conflicting_declarations_of_one_file_are_rejected(tmp_path: Path) -> None:
    a = Source(file="x.tar.xz", sha256=sha(PAYLOAD))
    b = Source(file="x.tar.xz", sha256=sha(OTHER))
    with pytest.raises(SourceError, match="declared twice"):
        verify({"p1": [a], "p2": [b]}, tmp_path)


# --------------------------------------------------------------------------- sets


def test_sets_keep_different_bytes_under_one_name_apart(server: Served, ws: Workspace) -> None:
    server.files["/up/a.tar.xz"] = PAYLOAD
    src = Source(file="a.tar.xz", url=f"{server.base}/up/a.tar.xz", sha256=sha(PAYLOAD))
    fetch([src], ws, progress=quiet())

    inner = OTHER
    orig = _tar_with({"wrap-1.0/a-dfsg.tar.xz": inner})
    server.files["/pool/a_1.0.orig.tar.gz"] = orig
    entry = DebianOrig(
        package="a",
        orig="a_1.0.orig.tar.gz",
        orig_sha256=sha(orig),
        member="a-dfsg.tar.xz",
        sha256=sha(inner),
    )
    deb = SourceSet(name="deb", kind="debian", files={"a.tar.xz": entry})
    apt = FakeApt(
        [AptFile(f"{server.base}/pool/a_1.0.orig.tar.gz", "a_1.0.orig.tar.gz", len(orig), None)]
    )
    fetch([src], ws, deb, progress=quiet(), apt=apt)

    assert (cache_dir_for(ws, "upstream") / "a.tar.xz").read_bytes() == PAYLOAD
    assert (cache_dir_for(ws, deb) / "a.tar.xz").read_bytes() == inner
    # The runner's call: no set given, the view's record says what to expect.
    verify([src], cache_dir_for(ws, "deb"))
    verify([src], cache_dir_for(ws, "upstream"))
    assert [s.state for s in status([src], cache_dir_for(ws, "deb"))] == ["ok"]


def test_debian_orig_digest_must_match_archive_index(server: Served, ws: Workspace) -> None:
    entry = DebianOrig(package="a", orig="a.orig.tar.xz", orig_sha256="1" * 64, sha256="1" * 64)
    deb = SourceSet(name="deb", kind="debian", files={"a.tar.xz": entry})
    apt = FakeApt([AptFile(f"{server.base}/a", "a.orig.tar.xz", 3, "2" * 64)])
    with pytest.raises(SourceError, match="archive index says sha256 2222"):
        fetch([Source(file="a.tar.xz")], ws, deb, progress=quiet(), apt=apt)


def test_shipped_debian12_set_loads() -> None:
    s = load_source_set("debian12")
    assert s.kind == "debian"
    assert s.files["gcc-12.2.0.tar.xz"].member == "gcc-12.2.0-dfsg.tar.xz"
    assert s.files["linux-6.1.176.tar.xz"].version == "6.1.176-1"


def test_unknown_set_is_an_actionable_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="unknown source set 'nope'"):
        load_source_set("nope", [tmp_path])


# --------------------------------------------------------------------------- debian plumbing


def test_derive_src_sources_reads_both_formats_in_apt_order(tmp_path: Path) -> None:
    etc = tmp_path / "etc-apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text("deb http://a.example/debian bookworm main\n")
    (etc / "sources.list.d" / "b.list").write_text("deb [arch=amd64] http://b.example/d sid main\n")
    (etc / "sources.list.d" / "c.sources").write_text(DEB822)
    (etc / "sources.list.d" / "d.sources").write_text(
        "Types: deb\nURIs: http://d.example/debian\nSuites: trixie\nComponents: main\n"
    )
    (etc / "sources.list.d" / "e.list.disabled").write_text("deb http://e.example/d sid main\n")
    deb822, oneline = derive_src_sources(etc)
    assert oneline == (
        "deb-src http://a.example/debian bookworm main\n"
        "deb-src [arch=amd64] http://b.example/d sid main\n"
    )
    assert deb822.count("Types: deb-src\n") == 3
    assert deb822.endswith(
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb-src\nURIs: http://d.example/debian\nSuites: trixie\nComponents: main\n"
    )


def test_derive_src_sources_without_apt_is_empty(tmp_path: Path) -> None:
    assert derive_src_sources(tmp_path / "missing") == ("", "")


def test_parse_print_uris() -> None:
    out = (
        "NOTICE: 'binutils' packaging is maintained in the 'Git' version control system at:\n"
        "Need to get 25.5 MB of source archives.\n"
        "'http://h/pool/main/b/binutils/binutils_2.40-2.dsc' binutils_2.40-2.dsc 11692 "
        "SHA256:cd75da7829d819189ba6154d408666373b307e222b393223804c4c4a7156f421\n"
        "'http://h/pool/main/g/gmp/gmp_6.2.1%2bdfsg1.orig.tar.xz' gmp_6.2.1+dfsg1.orig.tar.xz "
        "1787428 SHA256:471b9e463e04362a0124f215afc5f0a4b99caedeeb62634c61bbc12988efa64c\n"
    )
    files = parse_print_uris(out)
    assert [f.name for f in files] == ["binutils_2.40-2.dsc", "gmp_6.2.1+dfsg1.orig.tar.xz"]
    assert files[1].size == 1787428
    assert files[1].uri.endswith("gmp_6.2.1%2bdfsg1.orig.tar.xz")
    assert files[1].sha256 == "471b9e463e04362a0124f215afc5f0a4b99caedeeb62634c61bbc12988efa64c"


def test_apt_setup_is_private(tmp_path: Path) -> None:
    etc = tmp_path / "etc-apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list.d" / "debian.sources").write_text(DEB822)
    calls: list[list[str]] = []

    def runner(argv: list[str], **kw: object) -> object:
        calls.append(argv)

        class Done:
            returncode = 0
            stdout = "'http://h/a_1.orig.tar.xz' a_1.orig.tar.xz 3 SHA256:" + "a" * 64 + "\n"
            stderr = ""

        return Done()

    apt = AptSources(tmp_path / "apt", etc_apt=etc, runner=runner)  # type: ignore[arg-type]
    files = apt.files("a", "1-1")
    assert files[0].name == "a_1.orig.tar.xz"
    update, source = calls
    assert update[-1] == "update"
    assert source[-3:] == ["--print-uris", "--download-only", "a=1-1"]
    opts = " ".join(update)
    assert f"Dir::Etc::SourceParts={tmp_path / 'apt' / 'sources.list.d'}" in opts
    assert f"Dir::State::Lists={tmp_path / 'apt' / 'lists'}" in opts
    written = (tmp_path / "apt" / "sources.list.d" / "lfsorch-src.sources").read_text()
    assert written == DEB822_SRC
    assert (tmp_path / "apt" / "sources.list").read_text() == ""


# --------------------------------------------------------------------------- helpers


class FakeApt(AptSources):
    def __init__(self, files: list[AptFile]) -> None:
        super().__init__(Path("/nonexistent"))
        self._files = files

    def files(self, package: str, version: str | None = None) -> list[AptFile]:
        return self._files


def _tar_with(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_fetch_reports_every_failed_file_and_still_fetches_the_rest(
    server: Served, ws: Workspace
) -> None:
    server.files["/ok.tar.xz"] = PAYLOAD
    sources = [
        Source(file="a.tar.xz", url=f"{server.base}/missing-a", sha256=sha(OTHER)),
        Source(file="b.tar.xz", url=f"{server.base}/missing-b", sha256=sha(OTHER)),
        Source(file="ok.tar.xz", url=f"{server.base}/ok.tar.xz", sha256=sha(PAYLOAD)),
    ]
    with pytest.raises(SourceError) as err:
        fetch(sources, ws, progress=quiet())
    assert "2 source file(s) could not be fetched" in str(err.value)
    assert "a.tar.xz" in str(err.value) and "b.tar.xz" in str(err.value)
    assert (cache_dir_for(ws, "upstream") / "ok.tar.xz").read_bytes() == PAYLOAD
