"""A snapshot archive holds the tree and nothing about the machine that wrote it: numeric
owners without user or group names, no host name, no atime or ctime, names in order."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import zstandard

from orchestrator.checkpoints import archive
from orchestrator.checkpoints.treescan import scan_tree
from tests.helpers import make_tree


def _archive(tree: Path) -> bytes:
    out = io.BytesIO()
    archive.write_archive(tree, list(scan_tree(tree)), out)
    return zstandard.ZstdDecompressor().decompressobj().decompress(out.getvalue())


def test_members_carry_numeric_owners_and_no_names(tmp_path: Path) -> None:
    make_tree(tmp_path)
    raw = _archive(tmp_path)

    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
    assert {(m.uname, m.gname) for m in members} == {("", "")}
    assert {(m.uid, m.gid) for m in members} >= {(0, 0), (1000, 1001), (0, 5)}
    assert {key for m in members for key in m.pax_headers if not key.startswith("SCHILY.")} == {
        "mtime"
    }
    names = [m.name.removeprefix("./") or "." for m in members]
    assert names == sorted(names, key=archive.sort_key)
    # A ustar header's only text fields besides names are uname and gname, and PAX records
    # are checked above: nothing else in the archive can hold the host's or a user's name.
    assert b"ustar\x0000" in raw


def test_reading_files_or_changing_their_ctime_changes_no_byte(tmp_path: Path) -> None:
    make_tree(tmp_path)
    first = _archive(tmp_path)
    for path in tmp_path.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size:
            path.read_bytes()  # atime
            info = os.lstat(path)
            os.chmod(path, info.st_mode)  # ctime, nothing else
            os.utime(path, ns=(info.st_atime_ns + 10**9, info.st_mtime_ns))
    assert _archive(tmp_path) == first
