"""An orig the archive's index names but does not hold is taken from another archive apt lists.

Driven through real apt: a private apt sources list points at three archives served by a local
HTTP server on 127.0.0.1, each with its own Release and Sources index.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from orchestrator.sources.cache import cache_dir_for, fetch
from orchestrator.sources.debian import AptSources, parse_showsrc
from orchestrator.sources.download import PlainProgress
from orchestrator.sources.errors import ChecksumMismatch
from orchestrator.sources.sets import DebianOrig, Source, SourceSet
from orchestrator.workspace import Workspace
from tests.helpers import loopback_http

pytestmark = pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt (Debian)")


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


GOOD = _tar_gz({"hello-1.0/README": b"the real hello\n"})
TAMPERED = _tar_gz({"hello-1.0/README": b"not the real hello\n"})
ORIG = "hello_1.0.orig.tar.gz"
UPDATES = "pool/updates/main/h/hello"
MAIN = "pool/main/h/hello"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Archives:
    files: dict[str, bytes] = field(default_factory=dict)
    #: (path, status) of every request, in order
    log: list[tuple[str, int]] = field(default_factory=list)
    base: str = ""

    def pool_requests(self) -> list[tuple[str, int]]:
        return [(p, s) for p, s in self.log if "/pool/" in p]

    def add_archive(self, name: str, stanzas: list[tuple[str, str, str]]) -> None:
        """An archive with a `stable main` Sources index of (package, version, directory)."""
        sources = "\n".join(
            f"Package: {pkg}\nBinary: {pkg}\nVersion: {version}\nArchitecture: any\n"
            f"Format: 3.0 (quilt)\nDirectory: {directory}\nChecksums-Sha256:\n"
            f" {sha(GOOD)} {len(GOOD)} {pkg}_1.0.orig.tar.gz\n"
            for pkg, version, directory in stanzas
        ).encode()
        release = (
            "Suite: stable\nCodename: stable\nComponents: main\nArchitectures: source\n"
            f"SHA256:\n {sha(sources)} {len(sources)} main/source/Sources\n"
        ).encode()
        self.files[f"/{name}/dists/stable/main/source/Sources"] = sources
        self.files[f"/{name}/dists/stable/Release"] = release


@pytest.fixture
def archives() -> Iterator[Archives]:
    served = Archives()

    def get(handler: BaseHTTPRequestHandler) -> None:
        data = served.files.get(handler.path)
        served.log.append((handler.path, 404 if data is None else 200))
        if data is None:
            handler.send_error(404)
            return
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    with loopback_http(get) as base:
        served.base = base
        yield served


def _machine_apt(tmp_path: Path, archives: Archives) -> Path:
    """An /etc/apt whose `deb` entries name the three local archives (unsigned, trusted)."""
    etc = tmp_path / "etc-apt"
    (etc / "sources.list.d").mkdir(parents=True)
    uris = " ".join(f"{archives.base}/{name}" for name in ("a1", "a2", "a3"))
    (etc / "sources.list.d" / "local.sources").write_text(
        f"Types: deb\nURIs: {uris}\nSuites: stable\nComponents: main\nTrusted: yes\n"
    )
    return etc


HELLO_SET = SourceSet(
    name="deb-test",
    kind="debian",
    files={
        "hello-1.0.tar.gz": DebianOrig(
            package="hello", orig=ORIG, orig_sha256=sha(GOOD), sha256=sha(GOOD)
        )
    },
)
NEEDED = {"test/hello": [Source(file="hello-1.0.tar.gz")]}


def quiet() -> PlainProgress:
    return PlainProgress(io.StringIO())


def _three_archives(archives: Archives) -> None:
    # a1: the security-like archive; its index has the newest version but not the orig.
    archives.add_archive("a1", [("hello", "1.0-2", UPDATES)])
    # a3: lists the older version, and serves other bytes than its index says.
    archives.add_archive("a3", [("hello", "1.0-1", MAIN)])
    archives.files[f"/a3/{MAIN}/{ORIG}"] = TAMPERED
    # a2: does not list hello at all, yet holds the orig in the pool a3's index points to.
    archives.add_archive("a2", [("other", "1.0-1", "pool/main/o/other")])
    archives.files[f"/a2/{MAIN}/{ORIG}"] = GOOD


def test_orig_missing_where_apt_names_it_is_taken_from_another_archive(
    archives: Archives, tmp_path: Path
) -> None:
    _three_archives(archives)
    ws = Workspace(tmp_path / "ws")
    apt = AptSources(ws.sources_dir / "apt", etc_apt=_machine_apt(tmp_path, archives))

    result = fetch(NEEDED, ws, HELLO_SET, apt=apt, progress=quiet())

    assert archives.pool_requests() == [
        (f"/a1/{UPDATES}/{ORIG}", 404),  # the URI apt names
        (f"/a3/{MAIN}/{ORIG}", 200),  # the other version apt lists: wrong bytes, refused
        (f"/a2/{UPDATES}/{ORIG}", 404),  # each listed pool directory under each archive
        (f"/a3/{UPDATES}/{ORIG}", 404),
        (f"/a1/{MAIN}/{ORIG}", 404),
        (f"/a2/{MAIN}/{ORIG}", 200),  # the declared bytes
    ]
    assert result.fell_back == {ORIG: f"{archives.base}/a2/{MAIN}/{ORIG}"}
    assert (cache_dir_for(ws, HELLO_SET) / "hello-1.0.tar.gz").read_bytes() == GOOD
    rejected = list((ws.sources_dir / "rejected" / "debian-orig").iterdir())
    assert [p.read_bytes() for p in rejected] == [TAMPERED]
    assert rejected[0].name == f"{ORIG}.{sha(TAMPERED)[:16]}.rejected"


def test_no_fallback_when_the_named_uri_works(archives: Archives, tmp_path: Path) -> None:
    _three_archives(archives)
    archives.files[f"/a1/{UPDATES}/{ORIG}"] = GOOD
    ws = Workspace(tmp_path / "ws")
    apt = AptSources(ws.sources_dir / "apt", etc_apt=_machine_apt(tmp_path, archives))

    result = fetch(NEEDED, ws, HELLO_SET, apt=apt, progress=quiet())

    assert archives.pool_requests() == [(f"/a1/{UPDATES}/{ORIG}", 200)]
    assert result.fell_back == {}


def test_no_good_copy_anywhere_names_every_place_tried(archives: Archives, tmp_path: Path) -> None:
    _three_archives(archives)
    del archives.files[f"/a2/{MAIN}/{ORIG}"]
    ws = Workspace(tmp_path / "ws")
    apt = AptSources(ws.sources_dir / "apt", etc_apt=_machine_apt(tmp_path, archives))

    with pytest.raises(ChecksumMismatch) as err:
        fetch(NEEDED, ws, HELLO_SET, apt=apt, progress=quiet())

    assert err.value.actual == sha(TAMPERED)
    message = err.value.message
    for path, _ in archives.pool_requests():
        assert f"{archives.base}{path}" in message
    assert len(archives.pool_requests()) == 6
    assert f"also tried {archives.base}/a1/{UPDATES}/{ORIG}: HTTP 404 Not Found\n" in message
    assert not (cache_dir_for(ws, HELLO_SET) / "hello-1.0.tar.gz").exists()
    assert not (ws.sources_dir / "store").exists()


def test_the_sets_own_mirror_is_tried_after_every_archive(
    archives: Archives, tmp_path: Path
) -> None:
    _three_archives(archives)
    del archives.files[f"/a2/{MAIN}/{ORIG}"]
    archives.files["/elsewhere/hello-1.0.tar.gz"] = GOOD
    mirrored = SourceSet(
        name="deb-test",
        kind="debian",
        files={
            "hello-1.0.tar.gz": DebianOrig(
                package="hello",
                orig=ORIG,
                orig_sha256=sha(GOOD),
                sha256=sha(GOOD),
                mirrors=[f"{archives.base}/elsewhere/hello-1.0.tar.gz"],
            )
        },
    )
    ws = Workspace(tmp_path / "ws")
    apt = AptSources(ws.sources_dir / "apt", etc_apt=_machine_apt(tmp_path, archives))

    result = fetch(NEEDED, ws, mirrored, apt=apt, progress=quiet())

    assert len(archives.pool_requests()) == 6  # every place apt knows of, first
    assert archives.log[-1] == ("/elsewhere/hello-1.0.tar.gz", 200)
    assert result.fell_back == {ORIG: f"{archives.base}/elsewhere/hello-1.0.tar.gz"}
    assert (cache_dir_for(ws, mirrored) / "hello-1.0.tar.gz").read_bytes() == GOOD


def test_a_mirror_without_the_origs_digest_is_refused() -> None:
    with pytest.raises(ValueError, match="mirrors need orig_sha256: a copy from elsewhere"):
        DebianOrig(package="p", orig="p_1.orig.tar.gz", sha256="a" * 64, mirrors=["http://x/p"])


def test_parse_showsrc_reads_every_version() -> None:
    out = (
        "Package: patch\nVersion: 2.7.6-7\nFiles:\n d41d8cd98f00b204e9800998ecf8427e 1 x.dsc\n"
        "Checksums-Sha256:\n " + "a" * 64 + " 783756 patch_2.7.6.orig.tar.xz\n"
        "Directory: pool/main/p/patch\n\n"
        "Package: patch\nVersion: 2.7.6-7+deb12u1\nChecksums-Sha256:\n "
        + "a" * 64
        + " 783756 patch_2.7.6.orig.tar.xz\n "
        + "b" * 64
        + " 16056 patch_2.7.6-7+deb12u1.debian.tar.xz\nDirectory: pool/updates/main/p/patch\n"
    )
    first, second = parse_showsrc(out)
    assert (first.version, first.directory) == ("2.7.6-7", "pool/main/p/patch")
    assert first.sha256 == {"patch_2.7.6.orig.tar.xz": "a" * 64}
    assert second.directory == "pool/updates/main/p/patch"
    assert second.sha256["patch_2.7.6-7+deb12u1.debian.tar.xz"] == "b" * 64
