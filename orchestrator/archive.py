"""Deterministic tar+zstd archives of a directory tree, streaming validation, safe extraction.

Writing: GNU tar (fast, knows every file type, xattrs, hard links) produces a PAX stream from
an explicit, sorted file list; Python compresses it with multi-threaded zstd and, on the way
through, hashes the compressed bytes and every regular file's data. The archive's bytes depend
only on the tree: sorted names, numeric owners without names, no atime/ctime, a fixed PAX
extended header name. Modification times are kept exactly (nanoseconds): make depends on them,
and they are part of "the same tree", so determinism does not need them clamped.

Reading: an archive is never trusted, not even one this tool wrote. `TarScanner` parses the
stream block by block, and `MemberPolicy` refuses a member before a single byte of it (or of
its PAX header) is passed on, so the extractor only ever sees members that were checked.
The extractor is GNU tar inside a throwaway container that sees only the empty staging
directory, so even a disagreement between our parser and tar's is confined to that directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import queue
import shlex
import shutil
import stat
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

import zstandard

from orchestrator.errors import LfsorchError

ZSTD_LEVEL = 3
CHUNK = 1 << 20
# Compressed output is handed to the digest and the file in pieces of this size.
WRITE_SIZE = 1 << 20
BLOCK = 512
# GNU tar writes records of 20 blocks; padding our output the same way keeps tar quiet.
RECORD = 20 * BLOCK
EXTRACT_IMAGE = "lfsorch/base:bookworm"

TAR_CREATE_ARGS = (
    "--create",
    "--file=-",
    "--format=posix",
    "--numeric-owner",
    # The default extended-header name contains tar's pid, which would break determinism.
    "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
    "--xattrs",
    "--xattrs-include=*",
    # We pass every path ourselves, already sorted depth-first like --sort=name would.
    "--no-recursion",
    "--null",
    "--verbatim-files-from",
)
TAR_EXTRACT_ARGS = (
    "--extract",
    # A fifo delivers whatever the writer flushed; let tar reassemble full records.
    "--read-full-records",
    "--numeric-owner",
    "--same-owner",
    "--same-permissions",
    "--xattrs",
    "--xattrs-include=*",
    # Directory mtimes and modes are applied once every member is in place.
    "--delay-directory-restore",
)

# Character devices an LFS tree legitimately holds (chapter 7 creates console and null).
ALLOWED_CHAR_DEVICES: dict[tuple[int, int], str] = {
    (1, 3): "null",
    (1, 5): "zero",
    (1, 7): "full",
    (1, 8): "random",
    (1, 9): "urandom",
    (5, 0): "tty",
    (5, 1): "console",
    (5, 2): "ptmx",
}
_ALLOWED_PAX_KEYS = frozenset(
    {"path", "linkpath", "size", "uid", "gid", "uname", "gname", "mtime", "atime", "ctime"}
)
_XATTR_PREFIX = "SCHILY.xattr."
_TYPE_NAMES = {
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.LNKTYPE: "hardlink",
    tarfile.SYMTYPE: "symlink",
    tarfile.CHRTYPE: "chardev",
    tarfile.BLKTYPE: "blockdev",
    tarfile.DIRTYPE: "dir",
    tarfile.FIFOTYPE: "fifo",
}
DEFAULT_MAX_BYTES = 1 << 40


class UnsafeArchiveError(LfsorchError):
    """An archive holds a member that could write outside its tree or create a hazard."""

    def __init__(self, source: str, member: str, reason: str) -> None:
        super().__init__(
            f"{source}: member {member!r} {reason}",
            hint="the archive was not extracted and the target was left untouched; "
            "recreate the snapshot from a trusted tree",
        )
        self.source = source
        self.member = member
        self.reason = reason


class ArchiveError(LfsorchError):
    """Writing or extracting an archive failed for a reason other than its content."""


@dataclass
class Member:
    """One archive member after its PAX records are applied; names are canonical."""

    name: str
    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime: str
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    sha256: str | None = None


def canonical_name(raw: str) -> str:
    """Archive member name as the manifest spells it: no './' prefix or trailing '/'."""
    name = raw
    while name.startswith("./"):
        name = name[2:]
    if name in ("", "./", "."):
        return "."
    return name.rstrip("/") if name != "/" else name


# --------------------------------------------------------------------------- stream parsing


class TarScanner:
    """Incremental ustar/PAX parser fed with arbitrary chunks.

    `on_member` sees each member (and may raise to refuse it) before any of its bytes reach
    `emit`; `on_done` sees it again once its data is hashed. Only what GNU tar's posix format
    writes is understood; anything else (GNU long names, sparse files, global headers) is
    refused, which keeps our reading and tar's reading of the same bytes identical.
    """

    def __init__(
        self,
        source: str,
        *,
        on_member: Callable[[Member], None] | None = None,
        on_done: Callable[[Member], None] | None = None,
        emit: Callable[[bytes | bytearray | memoryview], Any] | None = None,
        hash_data: bool = True,
    ) -> None:
        self.source = source
        self._on_member = on_member
        self._on_done = on_done
        self._emit = emit
        self._hash_data = hash_data
        self._held = bytearray()  # header bytes not yet passed on
        self._need = BLOCK
        self._pax: dict[str, bytes] | None = None
        self._in_pax = False
        self._member: Member | None = None
        self._hasher: Any = None
        self._data_left = 0
        self._pad_left = 0
        self._zero_blocks = 0
        self.ended = False
        self.end_offset = 1 << 62  # emitted bytes up to the end-of-archive blocks
        self.emitted = 0
        self.raw_size = 0

    def feed(self, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk)
        self.raw_size += len(view)
        pos, end = 0, len(view)
        while pos < end:
            if self.ended:
                self._trailing(view[pos:])
                return
            if self._data_left or self._pad_left:
                pos = self._data(view, pos, end)
                continue
            take = min(self._need - len(self._held), end - pos)
            self._held += view[pos : pos + take]
            pos += take
            if len(self._held) == self._need:
                self._block_ready()

    def close(self) -> None:
        if not self.ended or self._pax is not None:
            name = self._member.name if self._member else "(end)"
            raise UnsafeArchiveError(self.source, name, "is cut short (truncated archive)")
        if self._emit is not None and self.emitted % RECORD:
            self._out(bytes(RECORD - self.emitted % RECORD))

    def _out(self, data: bytes | bytearray | memoryview) -> None:
        if self._emit is not None:
            self._emit(data)
            self.emitted += len(data)

    def _trailing(self, rest: memoryview) -> None:
        if any(rest.tobytes()):
            raise UnsafeArchiveError(self.source, "(end)", "is followed by trailing data")

    def _data(self, view: memoryview, pos: int, end: int) -> int:
        if self._data_left:
            take = min(self._data_left, end - pos)
            part = view[pos : pos + take]
            if self._hasher is not None:
                self._hasher.update(part)
            self._out(part)
            self._data_left -= take
            pos += take
            if not self._data_left:
                self._finish_member()
            return pos
        take = min(self._pad_left, end - pos)
        self._out(view[pos : pos + take])
        self._pad_left -= take
        return pos + take

    def _block_ready(self) -> None:
        if self._in_pax:
            self._pax = _parse_pax(self.source, bytes(self._held[BLOCK:]), self._pending_name())
            self._in_pax = False
            self._need = len(self._held) + BLOCK
            return
        block = bytes(self._held[-BLOCK:])
        if not any(block):
            self._zero_block()
            return
        if self._zero_blocks:
            raise UnsafeArchiveError(self.source, "(end)", "has a lone zero block mid-stream")
        info = self._header(block)
        if info.type == tarfile.XHDTYPE:
            if self._pax is not None:
                raise UnsafeArchiveError(self.source, info.name, "has two PAX headers in a row")
            self._in_pax = True
            self._need = len(self._held) + _padded(info.size)
            if info.size > 1 << 20:
                raise UnsafeArchiveError(self.source, info.name, "has an oversized PAX header")
            return
        member = self._member_from(info)
        if self._on_member is not None:
            self._on_member(member)
        self._out(self._held)
        self._held = bytearray()
        self._need = BLOCK
        self._pax = None
        self._member = member
        self._data_left = member.size
        self._pad_left = _padded(member.size) - member.size
        self._hasher = hashlib.sha256() if self._hash_data and member.kind == "file" else None
        if not member.size:
            self._finish_member()

    def _pending_name(self) -> str:
        return "(PAX header)"

    def _zero_block(self) -> None:
        self._zero_blocks += 1
        if self._zero_blocks == 2:
            self._out(self._held)
            self._held = bytearray()
            self.ended = True
            self.end_offset = self.emitted
        else:
            self._need = len(self._held) + BLOCK

    def _header(self, block: bytes) -> _Header:
        try:
            return _parse_header(block)
        except ValueError as exc:
            reason = f"is not a valid tar header ({exc})"
            raise UnsafeArchiveError(self.source, "(header)", reason) from None

    def _member_from(self, info: _Header) -> Member:
        pax = self._pax or {}
        raw_name = _text(pax["path"]) if "path" in pax else info.name
        name = canonical_name(raw_name)
        kind = _TYPE_NAMES.get(info.type)
        if kind is None:
            raise UnsafeArchiveError(
                self.source,
                name,
                f"has unsupported type {info.type!r} (only files, dirs, "
                "links, char devices and fifos are allowed)",
            )
        member = Member(
            name=name,
            kind=kind,
            mode=info.mode,
            uid=_pax_int(self.source, name, pax, "uid", info.uid),
            gid=_pax_int(self.source, name, pax, "gid", info.gid),
            size=_pax_int(self.source, name, pax, "size", info.size),
            mtime=_text(pax["mtime"]) if "mtime" in pax else str(int(info.mtime)),
            linkname=_text(pax["linkpath"]) if "linkpath" in pax else info.linkname,
            devmajor=info.devmajor,
            devminor=info.devminor,
            xattrs={k[len(_XATTR_PREFIX) :]: v for k, v in pax.items() if k.startswith("SCHILY")},
        )
        return member

    def _finish_member(self) -> None:
        member = self._member
        assert member is not None
        if self._hasher is not None:
            member.sha256 = self._hasher.hexdigest()
            self._hasher = None
        if self._on_done is not None:
            self._on_done(member)


@dataclass(frozen=True, slots=True)
class _Header:
    name: str
    type: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    linkname: str
    devmajor: int
    devminor: int


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:
        # GNU base-256: our writer uses PAX records for big values instead.
        raise ValueError("base-256 number")
    digits = field.split(b"\0", 1)[0].strip(b" ")
    return int(digits, 8) if digits else 0


def _nts(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _parse_header(block: bytes) -> _Header:
    """Parse a ustar header; tarfile.TarInfo.frombuf is five times slower for this."""
    if _octal(block[148:156]) != sum(block) - sum(block[148:156]) + 256:
        raise ValueError("bad checksum")
    if block[257:265] != b"ustar\x0000":
        raise ValueError("not POSIX ustar")
    name = _nts(block[0:100])
    prefix = _nts(block[345:500])
    return _Header(
        name=f"{prefix}/{name}" if prefix else name,
        type=block[156:157],
        mode=_octal(block[100:108]),
        uid=_octal(block[108:116]),
        gid=_octal(block[116:124]),
        size=_octal(block[124:136]),
        mtime=_octal(block[136:148]),
        linkname=_nts(block[157:257]),
        devmajor=_octal(block[329:337]),
        devminor=_octal(block[337:345]),
    )


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def _pax_int(source: str, name: str, pax: dict[str, bytes], key: str, default: int) -> int:
    if key not in pax:
        return default
    try:
        value = int(pax[key])
    except ValueError:
        raise UnsafeArchiveError(source, name, f"has a malformed PAX {key} record") from None
    if value < 0:
        raise UnsafeArchiveError(source, name, f"has a negative PAX {key} record")
    return value


def _parse_pax(source: str, data: bytes, where: str) -> dict[str, bytes]:
    """Parse PAX records ("LEN key=value\\n"), refusing keys that could change semantics."""
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise UnsafeArchiveError(source, where, "has a malformed PAX record") from None
        record = data[space + 1 : pos + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise UnsafeArchiveError(source, where, "has a malformed PAX record")
        key_raw, value = record[:-1].split(b"=", 1)
        key = key_raw.decode("utf-8", "surrogateescape")
        if key not in _ALLOWED_PAX_KEYS and not key.startswith(_XATTR_PREFIX):
            raise UnsafeArchiveError(source, where, f"has an unsupported PAX record {key!r}")
        if key in records:
            raise UnsafeArchiveError(source, where, f"repeats the PAX record {key!r}")
        records[key] = value
        pos += length
    return records


# --------------------------------------------------------------------------- member policy


class MemberPolicy:
    """The rules every member must pass before it reaches the extractor.

    `symlinks` seeds the symlinks already present in the directory the archive is extracted
    over (earlier layers of a delta chain), so a later layer cannot write through them.
    """

    def __init__(
        self,
        source: str,
        *,
        symlinks: Iterable[str] = (),
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.source = source
        self.symlinks = set(symlinks)
        self.max_bytes = max_bytes
        self.total = 0
        self._seen: set[str] = set()
        self._regular: set[str] = set()

    def refuse(self, member: str, reason: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(self.source, member, reason)

    def check(self, member: Member) -> None:
        name = member.name
        self._check_name(name)
        if name in self._seen:
            raise self.refuse(name, "appears twice")
        self._check_parents(name)
        self._check_kind(member)
        self.total += member.size
        if self.total > self.max_bytes:
            raise self.refuse(
                name, f"takes the archive past its size limit of {self.max_bytes} bytes"
            )
        if name in self.symlinks and member.kind != "symlink":
            raise self.refuse(name, "would replace a symlink of an earlier layer")
        self._seen.add(name)
        if member.kind == "file":
            self._regular.add(name)
        elif member.kind == "symlink":
            self.symlinks.add(name)
        else:
            self.symlinks.discard(name)

    def check_path(self, name: str) -> None:
        """Refuse a path that is not canonical, leaves the tree or passes a symlink."""
        self._check_name(name)
        self._check_parents(name)

    def _check_name(self, name: str) -> None:
        if name.startswith("/"):
            raise self.refuse(name, "escapes the tree (absolute path)")
        parts = name.split("/")
        if ".." in parts:
            raise self.refuse(name, "escapes the tree ('..' component)")
        if name != "." and ("" in parts or "." in parts):
            raise self.refuse(name, "has a non-canonical name (empty or '.' component)")

    def _check_parents(self, name: str) -> None:
        parts = name.split("/")
        for depth in range(1, len(parts)):
            prefix = "/".join(parts[:depth])
            if prefix in self.symlinks:
                raise self.refuse(name, f"lies below symlink {prefix!r} (would write through it)")

    def _check_kind(self, member: Member) -> None:
        name, kind = member.name, member.kind
        if name == "." and kind != "dir":
            raise self.refuse(name, "is the tree's root but not a directory")
        if kind != "file" and member.size:
            raise self.refuse(name, f"is a {kind} that carries data")
        if kind == "blockdev":
            raise self.refuse(
                name, f"is a block device ({member.devmajor}:{member.devminor}), never allowed"
            )
        if kind == "chardev" and (member.devmajor, member.devminor) not in ALLOWED_CHAR_DEVICES:
            allowed = ", ".join(sorted(ALLOWED_CHAR_DEVICES.values()))
            raise self.refuse(
                name,
                f"is character device {member.devmajor}:{member.devminor}, "
                f"not one of the allowed ({allowed})",
            )
        if kind == "hardlink" and canonical_name(member.linkname) not in self._regular:
            raise self.refuse(
                name,
                f"is a hard link to {member.linkname!r}, "
                "which is not an earlier regular file of the archive",
            )
        if kind in ("symlink", "hardlink") and "\0" in member.linkname:
            raise self.refuse(name, "has a link target containing NUL")


def scan_stream(
    stream: IO[bytes],
    policy: MemberPolicy,
    *,
    emit: Callable[[bytes | bytearray | memoryview], Any] | None,
) -> list[Member]:
    """Validate an uncompressed tar stream, passing checked bytes to `emit`; return members."""
    members: list[Member] = []
    scanner = TarScanner(policy.source, on_member=policy.check, on_done=members.append, emit=emit)
    while chunk := stream.read(CHUNK):
        scanner.feed(chunk)
    scanner.close()
    return members


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True, slots=True)
class Archived:
    """One member as our own tar wrote it: what the manifest needs, nothing more."""

    name: str  # canonical
    kind: str
    size: int
    linkname: str
    sha256: str | None  # regular files only


@dataclass(frozen=True)
class WriteResult:
    sha256: str  # of the compressed archive
    size: int  # compressed bytes
    raw_size: int  # uncompressed tar bytes
    members: list[Archived]


class _HashingFile:
    """Write-through wrapper that hashes and counts what the compressor writes."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self._out.write(data)


class _TarIndexer:
    """Lean parser for the stream *our* GNU tar writes: names, kinds, sizes, file digests.

    Not a validator: untrusted archives go through `TarScanner`/`MemberPolicy`. This one only
    has to be right about tar's posix output (it refuses anything else) and cheap, because it
    runs beside compression on every byte of a full snapshot. Per member it reads the type,
    size, name and link fields and the PAX `path`/`linkpath`/`size` records; file data is
    hashed straight from memoryview slices of the chunk and never copied.
    """

    def __init__(self) -> None:
        self.members: list[Archived] = []
        self.raw_size = 0
        self.ended = False
        self._held = bytearray()  # header (or PAX header data) bytes gathered so far
        self._need = BLOCK  # bytes `_held` must reach before it can be parsed
        self._pax_size = -1  # >= 0 while gathering a PAX header's records
        self._pax: dict[bytes, bytes] = {}
        self._zero_blocks = 0
        self._data_left = 0  # data bytes of the current member still to hash
        self._skip = 0  # padding still to skip after them
        self._hasher: Any = None
        self._pending: tuple[str, str, int, str] | None = None

    def feed(self, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk)
        end = len(view)
        self.raw_size += end
        pos = 0
        while pos < end:
            if self._data_left:
                take = min(self._data_left, end - pos)
                if self._hasher is not None:
                    self._hasher.update(view[pos : pos + take])
                self._data_left -= take
                pos += take
                if not self._data_left:
                    self._finish()
            elif self._skip:
                take = min(self._skip, end - pos)
                self._skip -= take
                pos += take
            elif self.ended:
                return  # end-of-archive blocks and record padding: zeros, nothing to index
            elif not self._held and end - pos >= self._need:
                # The common case: the whole header lies inside this chunk, no copy needed.
                stop = pos + self._need
                self._header(view[pos:stop])
                pos = stop
            else:
                take = min(self._need - len(self._held), end - pos)
                self._held += view[pos : pos + take]
                pos += take
                if len(self._held) == self._need:
                    held, self._held = self._held, bytearray()
                    self._header(memoryview(held))

    def close(self) -> None:
        if not self.ended or self._data_left or self._pending is not None:
            raise ArchiveError("tar output ended before its end-of-archive blocks")

    def _header(self, data: memoryview) -> None:
        if self._pax_size >= 0:
            self._pax = _pax_records(bytes(data[: self._pax_size]))
            self._pax_size = -1
            self._need = BLOCK
            return
        block = bytes(data)
        if block[257:265] != b"ustar\x0000":
            if not any(block):
                self._zero_blocks += 1
                self.ended = self._zero_blocks == 2
                return
            raise ArchiveError(f"tar wrote a header this tool does not read: {block[:100]!r}")
        type_ = block[156:157]
        pax, self._pax = self._pax, {}
        size = int(pax[b"size"]) if b"size" in pax else _octal(block[124:136])
        if type_ == tarfile.XHDTYPE:
            self._pax_size = size
            self._need = _padded(size)
            return
        kind = _TYPE_NAMES.get(type_)
        if kind is None:
            raise ArchiveError(f"tar wrote a member of unexpected type {type_!r}")
        if b"path" in pax:
            name = _text(pax[b"path"])
        else:
            prefix = _nts(block[345:500])
            name = f"{prefix}/{_nts(block[0:100])}" if prefix else _nts(block[0:100])
        link = _text(pax[b"linkpath"]) if b"linkpath" in pax else _nts(block[157:257])
        self._pending = (canonical_name(name), kind, size, link)
        self._hasher = hashlib.sha256() if kind == "file" else None
        self._data_left = size
        self._skip = _padded(size) - size
        if not size:
            self._finish()

    def _finish(self) -> None:
        assert self._pending is not None
        name, kind, size, link = self._pending
        digest = self._hasher.hexdigest() if self._hasher is not None else None
        self.members.append(Archived(name, kind, size, link, digest))
        self._pending = None
        self._hasher = None


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """PAX records of a header tar itself wrote ("LEN key=value\\n", values may hold anything)."""
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos]:
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key] = value
        pos += length
    return records


def sort_key(path: str) -> tuple[int, list[str]]:
    """Depth-first name order: a directory's whole subtree follows it directly."""
    return (0, []) if path == "." else (1, path.split("/"))


def write_archive(tree: Path, paths: Iterable[str], out: BinaryIO) -> WriteResult:
    """Write a zstd-compressed PAX archive of `paths` (relative to `tree`, "." is the root).

    `paths` are archived in the order given; pass them sorted with `sort_key`. They may come
    from a lazy iterable (a tree walk): tar gets each name as soon as it is produced, so the
    walk overlaps with archiving instead of running before it on one core. An exception
    raised by the iterable is re-raised here once tar has stopped.
    """
    command = ["tar", "-C", str(tree), *TAR_CREATE_ARGS, "--files-from=-"]
    return _compress_from(command, paths, out)


def _compress_from(command: list[str], names: Iterable[str], out: BinaryIO) -> WriteResult:
    indexer = _TarIndexer()
    sink = _HashingFile(out)
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1)
    # stderr goes to a file: a pipe could fill with warnings and stall tar mid-archive.
    with (
        tempfile.TemporaryFile(prefix="lfsorch-tar-") as stderr,
        subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr
        ) as proc,
    ):
        assert proc.stdin is not None and proc.stdout is not None
        with contextlib.suppress(OSError):
            # A 1 MiB pipe instead of 64 KiB: tar writes 10 KiB records, and each full pipe
            # costs a wake-up on both sides.
            fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, CHUNK)
        feeder = _NameFeeder(proc.stdin, names)
        try:
            # Indexing and hashing file data runs beside compression (both release the GIL
            # for their heavy part), so the pipeline costs about what the slower of them does.
            with (
                _Consumer(indexer.feed) as parse,
                compressor.stream_writer(
                    sink,  # type: ignore[arg-type]
                    closefd=False,
                    write_size=WRITE_SIZE,
                ) as writer,
            ):
                while chunk := proc.stdout.read(CHUNK):
                    parse.put(chunk)
                    writer.write(chunk)
        except BaseException:
            proc.kill()  # unblocks the feeder too (its pipe breaks)
            raise
        finally:
            feeder.join()
        status = proc.wait()
        stderr.seek(0)
        errors = stderr.read().decode(errors="replace").strip()
    if feeder.error is not None and not isinstance(feeder.error, BrokenPipeError):
        raise feeder.error  # the walk failed: tar archived only part of the tree
    if status != 0 or feeder.error is not None:
        raise ArchiveError(f"tar could not archive the tree (exit {status}): {errors}")
    indexer.close()
    return WriteResult(sink.hash.hexdigest(), sink.size, indexer.raw_size, indexer.members)


class _NameFeeder:
    """Writes NUL-terminated names to tar's stdin from a thread, then closes it."""

    def __init__(self, stdin: IO[bytes], names: Iterable[str]) -> None:
        self._stdin = stdin
        self._names = names
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        batch = bytearray()
        try:
            for name in self._names:
                batch += os.fsencode(name)
                batch += b"\0"
                if len(batch) >= 1 << 14:
                    self._stdin.write(batch)
                    batch.clear()
            self._stdin.write(batch)
        except BaseException as exc:
            self.error = exc
        finally:
            with contextlib.suppress(OSError):
                self._stdin.close()

    def join(self) -> None:
        self._thread.join()


class _Consumer:
    """Runs `work` on each put() item in a thread; re-raises its error on the way out."""

    def __init__(self, work: Callable[[bytes], None], depth: int = 16) -> None:
        self._work = work
        self._queue: queue.Queue[bytes | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Consumer:
        self._thread.start()
        return self

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._work(item)
                except BaseException as exc:
                    self._error = exc

    def put(self, item: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(item)

    def __exit__(self, *exc_info: object) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None and exc_info[0] is None:
            raise self._error


def prefetch(chunks: Iterable[bytes], depth: int = 16) -> Iterator[bytes]:
    """Produce `chunks` in a thread (decompression overlaps with parsing and extraction)."""
    results: queue.Queue[tuple[bytes | None, BaseException | None]] = queue.Queue(depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for chunk in chunks:
                if stop.is_set():
                    return
                results.put((chunk, None))
            results.put((None, None))
        except BaseException as exc:
            results.put((None, exc))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            chunk, error = results.get()
            if error is not None:
                raise error
            if chunk is None:
                return
            yield chunk
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                results.get_nowait()
        thread.join(timeout=5)


# --------------------------------------------------------------------------- reading


def decompressed_chunks(path: Path, expected_sha256: str, source: str) -> Iterator[bytes]:
    """Yield the decompressed archive; raise at the end if its compressed digest differs.

    The digest covers the whole file, so it is only known after the last chunk: callers
    extract into a staging directory that is discarded unless the whole stream passed.
    """
    digest = hashlib.sha256()

    class _Tee:
        def __init__(self, raw: BinaryIO) -> None:
            self._raw = raw

        def read(self, size: int = -1) -> bytes:
            data = self._raw.read(size)
            digest.update(data)
            return data

    with path.open("rb") as raw:
        tee: Any = _Tee(raw)
        reader = zstandard.ZstdDecompressor().stream_reader(tee, read_across_frames=True)
        try:
            while chunk := reader.read(CHUNK):
                yield chunk
        except zstandard.ZstdError as exc:
            raise ArchiveError(f"{source}: archive {path} is corrupt ({exc})") from None
        while raw.read(CHUNK):
            pass  # nothing should follow the frames, but hash it so a mismatch shows
    if digest.hexdigest() != expected_sha256:
        raise ArchiveError(
            f"{source}: archive {path} has sha256 {digest.hexdigest()[:16]}…, "
            f"the manifest says {expected_sha256[:16]}…",
            hint="the archive was altered or damaged; delete the snapshot and recreate it",
        )


class _ChunkStream:
    """File-like over an iterator of chunks (what scan_stream reads)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)

    def read(self, size: int = -1) -> bytes:
        return next(self._chunks, b"")


def chunk_stream(chunks: Iterable[bytes]) -> IO[bytes]:
    return _ChunkStream(chunks)  # type: ignore[return-value]


# --------------------------------------------------------------------------- extraction


@dataclass
class Layer:
    """One archive to extract, with the deletions to apply to the tree before it."""

    chunks: Iterable[bytes]
    policy: MemberPolicy
    delete_before: list[str] = field(default_factory=list)
    on_member: Callable[[Member], None] | None = None


class ContainerExtractor:
    """Extract validated layers into `dest` with GNU tar in a throwaway container.

    The container has no network and only `dest` (read-write) plus a directory of fifos
    (read-only) mounted. Layer i goes through fifo i to the i-th tar process: opening fifo i
    for writing succeeds only once tar i opened it, i.e. after tar i-1 finished, which is the
    moment the host may apply layer i's deletions.
    """

    def __init__(self, client: Any, dest: Path, *, image: str = EXTRACT_IMAGE) -> None:
        self.client = client
        self.dest = dest
        self.image = image

    def extract(self, layers: list[Layer], *, purpose: str = "snapshot-restore") -> None:
        from orchestrator.engine import managed_container

        with tempfile.TemporaryDirectory(prefix=".lfsorch-fifo-", dir=self.dest.parent) as io:
            fifos = [Path(io) / str(i) for i in range(len(layers))]
            for fifo in fifos:
                os.mkfifo(fifo, 0o600)
            script = (
                f"set -e; for i in $(seq 0 {len(layers) - 1}); do "
                f'tar {shlex.join(TAR_EXTRACT_ARGS)} -f "/io/$i" -C /dest; done'
            )
            with managed_container(
                self.client,
                purpose,
                image=self.image,
                command=["/bin/sh", "-c", script],
                network_mode="none",
                volumes={
                    str(self.dest): {"bind": "/dest", "mode": "rw"},
                    io: {"bind": "/io", "mode": "ro"},
                },
                cap_drop=["NET_RAW", "AUDIT_WRITE"],
            ) as container:
                container.start()
                for fifo, layer in zip(fifos, layers, strict=True):
                    self._feed(container, fifo, layer)
                status = container.wait(timeout=600)
                code = status.get("StatusCode", -1)
                if code != 0:
                    logs = container.logs().decode(errors="replace").strip()
                    raise ArchiveError(f"tar in the restore container failed (exit {code}): {logs}")

    def _feed(self, container: Any, fifo: Path, layer: Layer) -> None:
        fd = _open_fifo_for_writing(fifo, container)
        # The reader is waiting for data, so the previous layer is complete: safe to delete.
        for path in layer.delete_before:
            remove_path(self.dest, path, layer.policy)
        pipe = _Pipe(fd)
        scanner = TarScanner(
            layer.policy.source,
            on_member=layer.policy.check,
            on_done=layer.on_member,
            emit=pipe.write,
            hash_data=False,
        )
        try:
            for chunk in layer.chunks:
                scanner.feed(chunk)
            scanner.close()
        finally:
            pipe.close()
        if pipe.broken_at is not None and pipe.broken_at < scanner.end_offset:
            logs = container.logs().decode(errors="replace").strip()
            raise ArchiveError(f"tar in the restore container stopped reading early: {logs}")


class HostExtractor:
    """Extract validated layers into `dest` with the host's GNU tar, one process per layer.

    Used for the store's own archives: measured on the 2-core reference machine, tar in a
    container ran 1.4-2x slower than on the host (cgroup scheduling under load), which alone
    breaks the restore throughput target. Safety then rests on three layers: every member
    passed `MemberPolicy` before tar saw a byte of it (ustar/PAX only, allowlisted records,
    so our parse and tar's agree); GNU tar itself skips '..' members, strips leading '/'
    and creates link targets that are absolute or contain '..' as placeholders until the
    end; and everything lands in a fresh staging directory that is discarded on any error.
    """

    def __init__(self, dest: Path) -> None:
        self.dest = dest

    def extract(self, layers: list[Layer]) -> None:
        for layer in layers:
            for path in layer.delete_before:
                remove_path(self.dest, path, layer.policy)
            self._feed(layer)

    def _feed(self, layer: Layer) -> None:
        command = ["tar", *TAR_EXTRACT_ARGS, "--file=-", "-C", str(self.dest)]
        with subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            assert proc.stdin is not None and proc.stderr is not None
            pipe = _Pipe(proc.stdin.fileno(), closefd=False)
            scanner = TarScanner(
                layer.policy.source,
                on_member=layer.policy.check,
                on_done=layer.on_member,
                emit=pipe.write,
                # The archive digest, checked against the manifest, already covers every
                # byte; re-hashing each file would cost a core-second per GB for nothing.
                hash_data=False,
            )
            try:
                for chunk in layer.chunks:
                    scanner.feed(chunk)
                scanner.close()
            finally:
                pipe.close()
                proc.stdin.close()
                errors = proc.stderr.read().decode(errors="replace").strip()
                status = proc.wait()
        if status != 0 or (pipe.broken_at is not None and pipe.broken_at < scanner.end_offset):
            raise ArchiveError(f"tar could not extract {layer.policy.source} (exit {status}): "
                               f"{errors}")  # fmt: skip


class _Pipe:
    """Buffered fifo writer that notes, instead of raising, when the reader has gone.

    tar may exit as soon as it has read the end-of-archive blocks; whether it stopped too
    early is judged from where the pipe broke, and the stream is still read to its end so
    the archive digest and every remaining member are checked.
    """

    def __init__(self, fd: int, *, closefd: bool = True) -> None:
        self._file = os.fdopen(fd, "wb", buffering=CHUNK, closefd=closefd)
        self.written = 0
        self.broken_at: int | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.broken_at is not None:
            return
        try:
            self._file.write(data)
        except BrokenPipeError:
            self.broken_at = self.written
            return
        self.written += len(data)

    def close(self) -> None:
        try:
            self._file.close()
        except BrokenPipeError:
            if self.broken_at is None:
                self.broken_at = self.written
            with contextlib.suppress(OSError):
                self._file.close()


def _open_fifo_for_writing(fifo: Path, container: Any, timeout: float = 120.0) -> int:
    """Open the fifo once the container's tar opened it, failing if the container died."""
    deadline = time.monotonic() + timeout
    checks = 0
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
        else:
            os.set_blocking(fd, True)
            return fd
        checks += 1
        if checks % 50 == 0:
            container.reload()
            if container.status not in ("created", "running"):
                logs = container.logs().decode(errors="replace").strip()
                raise ArchiveError(f"the restore container exited before reading: {logs}")
        if time.monotonic() > deadline:
            raise ArchiveError("the restore container did not start reading within 120 s")
        time.sleep(0.002)


def remove_path(root: Path, relative: str, policy: MemberPolicy) -> None:
    """Delete `relative` under `root` without following any symlink on the way."""
    policy.check_path(relative)
    target = root / relative
    try:
        info = target.lstat()
    except FileNotFoundError:
        info = None
    if info is not None and stat.S_ISDIR(info.st_mode):
        _rmtree(target)
    elif info is not None:
        target.unlink()
    policy.symlinks.discard(relative)


def _rmtree(path: Path) -> None:
    # shutil.rmtree does not follow symlinks, but read-only dirs need their mode lifted.
    def _retry(func: Callable[..., Any], target: str, _exc: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(target), 0o700)
        func(target)

    shutil.rmtree(path, onerror=_retry)


def tar_chunks(tree: Path, paths: list[str]) -> Iterator[bytes]:
    """The uncompressed archive of `paths` (same bytes `write_archive` compresses)."""
    with tempfile.NamedTemporaryFile(prefix="lfsorch-list-", suffix=".txt") as listing:
        listing.write(b"".join(os.fsencode(p) + b"\0" for p in paths))
        listing.flush()
        command = ["tar", "-C", str(tree), *TAR_CREATE_ARGS, f"--files-from={listing.name}"]
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            while chunk := proc.stdout.read(CHUNK):
                yield chunk
            errors = proc.stderr.read().decode(errors="replace").strip()
            if proc.wait() != 0:
                raise ArchiveError(
                    f"tar could not archive {tree} (exit {proc.returncode}): {errors}"
                )
