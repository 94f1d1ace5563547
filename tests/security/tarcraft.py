"""Byte-level tar members and hand-written snapshot stores, for hostile-input tests.

Python's tarfile cannot write what an attacker writes (a PAX length of "+25", a NUL inside a
PAX path, a manifest that disagrees with its archive), so members are laid out by hand here.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

BLOCK = 512
MTIME = 1_700_000_000


def header(
    name: bytes,
    kind: bytes,
    *,
    size: int = 0,
    mode: int = 0o644,
    linkname: bytes = b"",
    uid: int = 0,
    gid: int = 0,
    prefix: bytes = b"",
    device: tuple[int, int] = (0, 0),
) -> bytes:
    """One ustar header block with a correct checksum."""
    block = bytearray(BLOCK)
    block[0:100] = name.ljust(100, b"\0")[:100]
    block[100:108] = b"%07o\0" % mode
    block[108:116] = b"%07o\0" % uid
    block[116:124] = b"%07o\0" % gid
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"%011o\0" % MTIME
    block[148:156] = b" " * 8
    block[156:157] = kind
    block[157:257] = linkname.ljust(100, b"\0")[:100]
    block[257:265] = b"ustar\x0000"
    block[329:337] = b"%07o\0" % device[0]
    block[337:345] = b"%07o\0" % device[1]
    block[345:500] = prefix.ljust(155, b"\0")[:155]
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def record(key: bytes, value: bytes) -> bytes:
    """A well-formed PAX record: its length counts its own digits."""
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


def pax(records: bytes, name: bytes = b"PaxHeaders/member") -> bytes:
    """A PAX extended header carrying `records` exactly as given."""
    return header(name, b"x", size=len(records)) + padded(records)


def member(name: bytes, kind: bytes = b"0", data: bytes = b"", **fields: Any) -> bytes:
    return header(name, kind, size=len(data), **fields) + padded(data)


def end() -> bytes:
    return bytes(2 * BLOCK)


@dataclass
class Snapshot:
    """What an attacker writes into the store for one snapshot: archive and manifest."""

    key: str
    stream: bytes
    entries: list[dict[str, Any]]
    delta_of: str | None = None
    deleted: list[str] = field(default_factory=list)


def entry(path: str, kind: str, layer: str, **fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "path": path,
        "type": kind,
        "mode": fields.pop("mode", 0o755 if kind == "dir" else 0o644),
        "uid": 0,
        "gid": 0,
        "size": 0,
        "mtime_ns": MTIME * 10**9,
        "sha256": None,
        "layer": layer,
    }
    data.update(fields)
    return data


def file_entry(path: str, layer: str, content: bytes, mode: int = 0o644) -> dict[str, Any]:
    digest = hashlib.sha256(content).hexdigest()
    return entry(path, "file", layer, size=len(content), sha256=digest, mode=mode)


def write_snapshot(store_root: Path, snapshot: Snapshot, stage: str = "ch5") -> None:
    """Lay the snapshot out as the store does: `<key>/archive.tar.zst` and its manifest."""
    directory = store_root / snapshot.key
    directory.mkdir(parents=True)
    compressed = zstandard.ZstdCompressor().compress(snapshot.stream)
    (directory / "archive.tar.zst").write_bytes(compressed)
    manifest = {
        "version": 1,
        "key": snapshot.key,
        "stage": stage,
        "parent": snapshot.delta_of,
        "delta_of": snapshot.delta_of,
        "created": float(MTIME),
        "metadata": {},
        "archive": {
            "file": "archive.tar.zst",
            "sha256": hashlib.sha256(compressed).hexdigest(),
            "size": len(compressed),
            "raw_size": len(snapshot.stream),
        },
        "deleted": snapshot.deleted,
        "replaced": [],
        "entries": snapshot.entries,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))


# --------------------------------------------------------------------------- canaries

CANARY_BYTES = b"#!/bin/sh\necho the host's own setuid helper\n"


def plant_canary(outside: Path) -> Path:
    """A directory outside the partition holding a root-owned setuid file."""
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(CANARY_BYTES)
    os.chmod(victim, 0o4755)
    return victim


def canary_state(outside: Path) -> dict[str, tuple[int, int, bytes | str]]:
    """Names, modes, inodes and bytes (or link targets) of everything in the canary dir."""
    state: dict[str, tuple[int, int, bytes | str]] = {}
    for path in [outside, *sorted(outside.rglob("*"))]:
        info = os.lstat(path)
        if stat.S_ISREG(info.st_mode):
            content: bytes | str = path.read_bytes()
        elif stat.S_ISLNK(info.st_mode):
            content = os.readlink(path)
        else:
            content = ""
        state[str(path.relative_to(outside))] = (info.st_mode, info.st_ino, content)
    return state


def assert_canary_intact(victim: Path, before: dict[str, tuple[int, int, bytes | str]]) -> None:
    assert victim.read_bytes() == CANARY_BYTES
    assert stat.S_IMODE(os.lstat(victim).st_mode) == 0o4755
    assert canary_state(victim.parent) == before


# --------------------------------------------------------------------------- hostile chains
# Each lays a symlink `x -> <canary dir outside the partition>` in one layer and then tries to
# write `x/victim` (an existing setuid file out there) in a later one.

ATTACK = b"#!/bin/sh\nid > /tmp/owned\n"
ATTACK_MODE = 0o6777


def _root_member() -> bytes:
    return member(b"./", b"5", mode=0o755)


def base_with_symlink(store: Path, outside: Path, key: str, name: bytes = b"x") -> None:
    """Layer 0: the root and `x -> outside`, listed honestly in its manifest."""
    path = name.decode("utf-8", "surrogateescape")
    stream = _root_member()
    if b"\0" in name:
        stream += pax(record(b"path", name)) + member(b"x", b"2", linkname=bytes(outside))
    else:
        stream += member(name, b"2", linkname=bytes(outside))
    entries = [
        entry(".", "dir", key),
        entry(path, "symlink", key, mode=0o777, link=str(outside)),
    ]
    write_snapshot(store, Snapshot(key, stream + end(), entries))


def chain_manifest_omits_symlink(store: Path, outside: Path) -> str:
    """The middle manifest leaves `x` out although no layer deleted it: a restore that takes
    the earlier symlinks from that manifest lets the tip write through `x`."""
    base_with_symlink(store, outside, "a0")
    write_snapshot(store, Snapshot("a1", end(), [entry(".", "dir", "a0")], delta_of="a0"))
    tip = member(b"x/victim", data=ATTACK, mode=ATTACK_MODE)
    entries = [entry(".", "dir", "a0"), file_entry("x/victim", "a2", ATTACK, ATTACK_MODE)]
    write_snapshot(store, Snapshot("a2", tip + end(), entries, delta_of="a1"))
    return "a2"


def _plus_length_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    return b"+%d" % (len(body) + 3) + body  # "+NN": three characters before the blank


def chain_pax_length_with_sign(store: Path, outside: Path) -> str:
    """A PAX length written "+NN": Python's int() reads it, GNU tar drops the whole extended
    header and extracts under the ustar name `x/victim` instead of the PAX path."""
    base_with_symlink(store, outside, "b0")
    tip = pax(_plus_length_record(b"path", b"decoy")) + member(
        b"x/victim", data=ATTACK, mode=ATTACK_MODE
    )
    entries = [
        entry(".", "dir", "b0"),
        entry("x", "symlink", "b0", mode=0o777, link=str(outside)),
        file_entry("decoy", "b1", ATTACK, ATTACK_MODE),
    ]
    write_snapshot(store, Snapshot("b1", tip + end(), entries, delta_of="b0"))
    return "b1"


def chain_nul_in_pax_path(store: Path, outside: Path) -> str:
    """A symlink whose PAX path is "x\\0junk": tar creates `x`; the validator, reading the
    whole value, thinks `x` is a plain directory the next layer may write below."""
    base_with_symlink(store, outside, "c0", name=b"x\0junk")
    tip = member(b"x/victim", data=ATTACK, mode=ATTACK_MODE)
    entries = [
        entry(".", "dir", "c0"),
        entry("x\0junk", "symlink", "c0", mode=0o777, link=str(outside)),
        file_entry("x/victim", "c1", ATTACK, ATTACK_MODE),
    ]
    write_snapshot(store, Snapshot("c1", tip + end(), entries, delta_of="c0"))
    return "c1"
