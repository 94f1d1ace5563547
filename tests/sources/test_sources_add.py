"""`sources add`: local files enter the verified cache only when they match a declared checksum;
and every source archive passes the tarsafe check before it is first used."""

from __future__ import annotations

import hashlib
import io
import os
import random
import tarfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import zstandard

from orchestrator.sources.archives import unsafe_reason
from orchestrator.sources.cache import add, cache_dir_for, fetch, verify
from orchestrator.sources.download import PlainProgress
from orchestrator.sources.errors import SourceError, UnsafeArchive
from orchestrator.sources.sets import DebianOrig, Source, SourceSet
from orchestrator.workspace import Workspace
from tests.helpers import loopback_http, run_cli


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tarball(members: list[tarfile.TarInfo], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:  # type: ignore[call-overload]
        for info in members:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return buf.getvalue()


def regular(name: str, size: int = 3) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


SAFE = tarball([regular("pkg-1.0/README"), link("pkg-1.0/doc/README", "../README")])
DOTDOT = tarball([regular("pkg-1.0/README"), regular("../x")])
ABSOLUTE_LINK = tarball([regular("pkg-1.0/README"), link("pkg-1.0/passwd", "/etc/passwd")])


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for directories)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "ws")


# --------------------------------------------------------------------------- add


def test_add_takes_a_file_by_content_under_its_declared_name(tmp_path: Path, ws: Workspace) -> None:
    local = tmp_path / "downloaded-elsewhere.tgz"
    local.write_bytes(SAFE)
    needed = {"ch6/pkg": [Source(file="pkg-1.0.tar.gz", sha256=sha(SAFE))]}

    result = add([local], needed, ws)

    assert result.added == [(local, ["pkg-1.0.tar.gz"])] and result.refused == []
    cache = cache_dir_for(ws, "upstream")
    assert (cache / "pkg-1.0.tar.gz").read_bytes() == SAFE
    assert (ws.sources_dir / "store" / "sha256" / sha(SAFE)).read_bytes() == SAFE
    verify(needed, cache)
    assert local.read_bytes() == SAFE  # the user's file is copied, never moved


def test_add_matches_a_declared_md5(tmp_path: Path, ws: Workspace) -> None:
    local = tmp_path / "pkg-1.0.tar.gz"
    local.write_bytes(SAFE)
    md5 = hashlib.md5(SAFE).hexdigest()
    needed = [Source(file="pkg-1.0.tar.gz", md5=md5)]
    assert add([local], needed, ws).added == [(local, ["pkg-1.0.tar.gz"])]
    verify(needed, cache_dir_for(ws, "upstream"))


def test_add_refuses_a_mismatch_with_the_exact_reason_and_writes_nothing(
    tmp_path: Path, ws: Workspace
) -> None:
    local = tmp_path / "pkg-1.0.tar.gz"
    local.write_bytes(b"other bytes")
    declared = sha(SAFE)
    ws.root.mkdir()
    before = tree(tmp_path)

    result = add([local], [Source(file="pkg-1.0.tar.gz", sha256=declared)], ws)

    assert result.added == []
    [refused] = result.refused
    assert refused.message == (
        f"{local}: sha256 {sha(b'other bytes')} is not the declared sha256 {declared} "
        "of pkg-1.0.tar.gz"
    )
    assert tree(tmp_path) == before


def test_add_refuses_an_unknown_file_and_still_adds_the_others(
    tmp_path: Path, ws: Workspace
) -> None:
    stray = tmp_path / "notes.txt"
    stray.write_bytes(b"nothing anyone declared")
    good = tmp_path / "pkg.tgz"
    good.write_bytes(SAFE)
    needed = [Source(file="pkg-1.0.tar.gz", sha256=sha(SAFE))]

    result = add([stray, good], needed, ws)

    assert [exc.message for exc in result.refused] == [
        f"{stray}: sha256 {sha(b'nothing anyone declared')} matches no source of the given "
        "stage files (set upstream)"
    ]
    assert result.added == [(good, ["pkg-1.0.tar.gz"])]
    stored = tree(ws.sources_dir / "store")
    assert list(stored.values()) == [None, SAFE]  # sha256/ and the one good file


def test_add_refuses_a_fifo_without_blocking(tmp_path: Path, ws: Workspace) -> None:
    fifo = tmp_path / "pkg-1.0.tar.gz"
    os.mkfifo(fifo)
    result = add([fifo], [Source(file="pkg-1.0.tar.gz", sha256=sha(SAFE))], ws)
    assert [exc.message for exc in result.refused] == [f"{fifo}: not a regular file"]
    assert not ws.root.exists()


def test_add_debian_orig_gives_the_member_the_build_uses(tmp_path: Path, ws: Workspace) -> None:
    inner = SAFE
    info = regular("gcc-12.2.0-dfsg.tar.gz", len(inner))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.addfile(info, io.BytesIO(inner))
    orig = buf.getvalue()
    the_set = SourceSet(
        name="deb-test",
        kind="debian",
        files={
            "gcc-12.2.0.tar.gz": DebianOrig(
                package="gcc-12",
                orig="gcc-12_12.2.0.orig.tar.gz",
                orig_sha256=sha(orig),
                member="gcc-12.2.0-dfsg.tar.gz",
                sha256=sha(inner),
            )
        },
    )
    local = tmp_path / "gcc-12_12.2.0.orig.tar.gz"
    local.write_bytes(orig)
    needed = [Source(file="gcc-12.2.0.tar.gz")]

    result = add([local], needed, ws, the_set)

    assert result.added == [(local, ["gcc-12.2.0.tar.gz"])]
    cache = cache_dir_for(ws, the_set)
    assert (cache / "gcc-12.2.0.tar.gz").read_bytes() == inner
    verify(needed, cache)  # the view's record says what to expect, as the runner checks it


def test_add_sets_an_unsafe_archive_aside(tmp_path: Path, ws: Workspace) -> None:
    local = tmp_path / "pkg-1.0.tar.gz"
    local.write_bytes(DOTDOT)

    result = add([local], [Source(file="pkg-1.0.tar.gz", sha256=sha(DOTDOT))], ws)

    [refused] = result.refused
    aside = ws.sources_dir / "rejected" / "upstream" / f"pkg-1.0.tar.gz.{sha(DOTDOT)[:16]}.rejected"
    assert isinstance(refused, UnsafeArchive)
    assert refused.message == (
        "pkg-1.0.tar.gz is not safe to unpack: member '../x' would be written outside the "
        f"archive's directory; it was moved to {aside}"
    )
    assert aside.read_bytes() == DOTDOT
    assert local.read_bytes() == DOTDOT
    assert tree(ws.sources_dir / "store") == {}
    assert not (cache_dir_for(ws, "upstream") / "pkg-1.0.tar.gz").exists()


def test_cli_add_prints_what_it_took_and_fails_on_a_refusal(tmp_path: Path) -> None:
    stage = tmp_path / "st.yaml"
    stage.write_text(
        "stage: st\npackages:\n  - name: pkg\n    script: 'true'\n    sources:\n"
        f"      - file: pkg-1.0.tar.gz\n        sha256: {sha(SAFE)}\n"
    )
    good = tmp_path / "pkg-1.0.tar.gz"
    good.write_bytes(SAFE)
    stray = tmp_path / "stray"
    stray.write_bytes(b"stray")
    home = tmp_path / "home"
    argv = ["sources", "add", str(good), str(stray), "--for", str(stage), "--set", "upstream"]
    run = run_cli(*argv, home=home, timeout=60)
    assert run.returncode == SourceError.exit_code, run.stderr
    assert run.stdout == f"added {good} as pkg-1.0.tar.gz\n"
    assert f"{stray}: sha256 {sha(b'stray')} matches no source" in run.stderr
    assert "Traceback" not in run.stderr
    assert (home / "sources" / "sets" / "upstream" / "pkg-1.0.tar.gz").read_bytes() == SAFE


# --------------------------------------------------------------------------- tarsafe on fetch


@pytest.fixture
def http() -> Iterator[tuple[str, dict[str, bytes]]]:
    files: dict[str, bytes] = {}

    def get(handler: BaseHTTPRequestHandler) -> None:
        data = files.get(handler.path)
        if data is None:
            handler.send_error(404)
            return
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    with loopback_http(get) as base:
        yield base, files


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (DOTDOT, "member '../x' would be written outside the archive's directory"),
        (ABSOLUTE_LINK, "symlink 'pkg-1.0/passwd' points to the absolute path '/etc/passwd'"),
    ],
)
def test_fetch_sets_an_unsafe_archive_aside_before_first_use(
    http: tuple[str, dict[str, bytes]], ws: Workspace, data: bytes, reason: str
) -> None:
    base, files = http
    files["/pkg.tar.gz"] = data
    files["/ok.tar.gz"] = SAFE
    bad = Source(file="pkg-1.0.tar.gz", url=f"{base}/pkg.tar.gz", sha256=sha(data))
    ok = Source(file="ok-1.0.tar.gz", url=f"{base}/ok.tar.gz", sha256=sha(SAFE))

    with pytest.raises(UnsafeArchive) as err:
        fetch([bad, ok], ws, progress=PlainProgress(io.StringIO()))

    aside = ws.sources_dir / "rejected" / "upstream" / f"pkg-1.0.tar.gz.{sha(data)[:16]}.rejected"
    assert err.value.message == (
        f"pkg-1.0.tar.gz is not safe to unpack: {reason}; it was moved to {aside}"
    )
    assert aside.read_bytes() == data
    cache = cache_dir_for(ws, "upstream")
    assert sorted(p.name for p in cache.iterdir()) == [".lfsorch-set.json", "ok-1.0.tar.gz"]
    assert not (ws.sources_dir / "store" / "sha256" / sha(data)).exists()
    # Fetching again does not take the refused file from anywhere: it is refused again.
    with pytest.raises(UnsafeArchive):
        fetch([bad], ws, progress=PlainProgress(io.StringIO()))


# --------------------------------------------------------------------------- the rules


def _check(tmp_path: Path, data: bytes, name: str = "a.tar") -> str | None:
    path = tmp_path / name
    path.write_bytes(data)
    return unsafe_reason(path)


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        # A kernel tree's relative link, read from its own directory, stays inside.
        ([link("linux/tools/a/b/c/x.S", "../../../../arch/x.S")], None),
        ([regular("pkg/a/../b")], None),
        ([regular("/etc/cron.d/x")], "member '/etc/cron.d/x' has an absolute name"),
        (
            [link("pkg/a/up", "../../../y")],
            "symlink 'pkg/a/up' -> '../../../y' leaves the archive's directory",
        ),
        (
            [link("pkg/h", "../../y", tarfile.LNKTYPE)],
            "hard link 'pkg/h' -> '../../y' leaves the archive's directory",
        ),
        ([link("pkg/dev", "", tarfile.CHRTYPE)], "member 'pkg/dev' is a device or FIFO"),
        ([link("pkg/fifo", "", tarfile.FIFOTYPE)], "member 'pkg/fifo' is a device or FIFO"),
        (
            [link("pkg/l", ".."), regular("pkg/l/x")],
            "member 'pkg/l/x' is written through the symlink 'pkg/l'",
        ),
    ],
)
def test_archive_rules(tmp_path: Path, members: list[tarfile.TarInfo], reason: str | None) -> None:
    assert _check(tmp_path, tarball(members, "w")) == reason


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_every_compression_is_read(tmp_path: Path, mode: str) -> None:
    reason = _check(tmp_path, tarball([regular("../x")], mode), "a.bin")
    assert reason == "member '../x' would be written outside the archive's directory"


def test_zstd_archive_is_read(tmp_path: Path) -> None:
    data = zstandard.ZstdCompressor().compress(tarball([regular("../x")], "w"))
    assert _check(tmp_path, data, "a.tar.zst") == (
        "member '../x' would be written outside the archive's directory"
    )


def test_a_member_hidden_after_a_damaged_block_is_still_seen(tmp_path: Path) -> None:
    good = tarball([regular("pkg/a", 512)], "w")[:1024]  # header and data, no end marker
    data = good + b"\x01" * 512 + tarball([regular("../x")], "w")
    assert _check(tmp_path, data) == (
        "member '../x' would be written outside the archive's directory"
    )


def test_files_that_are_not_archives_are_not_checked(tmp_path: Path) -> None:
    import gzip

    assert _check(tmp_path, b"--- a/x\n+++ b/x\n" * 50, "fix.patch") is None
    assert _check(tmp_path, gzip.compress(b"-----BEGIN PGP SIGNATURE-----\n"), "x.gz") is None
    assert _check(tmp_path, b"", "empty") is None


def test_a_corrupt_compressed_archive_is_refused(tmp_path: Path) -> None:
    noise = random.Random(0).randbytes(100_000)  # incompressible, so the damage hits data
    info = regular("pkg/a", len(noise))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        tar.addfile(info, io.BytesIO(noise))
    data = bytearray(buf.getvalue())
    data[2000:2060] = b"\x00" * 60
    reason = _check(tmp_path, bytes(data), "a.tar.xz")
    assert reason is not None and reason.startswith("it cannot be read as a tar archive")
