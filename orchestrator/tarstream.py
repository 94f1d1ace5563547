"""Reading untrusted tar streams: a block-by-block ustar/PAX parser and the member rules.

An archive is never trusted, not even one this tool wrote. `TarScanner` parses the stream
block by block, and `MemberPolicy` refuses a member before a single byte of it (or of its PAX
header) is passed on, so whatever consumes the stream (the extractors in `extract`) only ever
sees members that were checked.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any

from orchestrator.errors import LfsorchError

CHUNK = 1 << 20
BLOCK = 512
# GNU tar writes records of 20 blocks; padding our output the same way keeps tar quiet.
RECORD = 20 * BLOCK

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
TYPE_NAMES = {
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
            self._need = len(self._held) + padded_size(info.size)
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
        self._pad_left = padded_size(member.size) - member.size
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
        raw_name = decode_text(pax["path"]) if "path" in pax else info.name
        name = canonical_name(raw_name)
        kind = TYPE_NAMES.get(info.type)
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
            mtime=decode_text(pax["mtime"]) if "mtime" in pax else str(int(info.mtime)),
            linkname=decode_text(pax["linkpath"]) if "linkpath" in pax else info.linkname,
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


def parse_octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:
        # GNU base-256: our writer uses PAX records for big values instead.
        raise ValueError("base-256 number")
    digits = field.split(b"\0", 1)[0].strip(b" ")
    return int(digits, 8) if digits else 0


def field_text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _parse_header(block: bytes) -> _Header:
    """Parse a ustar header; tarfile.TarInfo.frombuf is five times slower for this."""
    if parse_octal(block[148:156]) != sum(block) - sum(block[148:156]) + 256:
        raise ValueError("bad checksum")
    if block[257:265] != b"ustar\x0000":
        raise ValueError("not POSIX ustar")
    name = field_text(block[0:100])
    prefix = field_text(block[345:500])
    return _Header(
        name=f"{prefix}/{name}" if prefix else name,
        type=block[156:157],
        mode=parse_octal(block[100:108]),
        uid=parse_octal(block[108:116]),
        gid=parse_octal(block[116:124]),
        size=parse_octal(block[124:136]),
        mtime=parse_octal(block[136:148]),
        linkname=field_text(block[157:257]),
        devmajor=parse_octal(block[329:337]),
        devminor=parse_octal(block[337:345]),
    )


def padded_size(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def decode_text(value: bytes) -> str:
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
