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

    `on_member` sees each member (and may raise to refuse it) before any of its bytes (or of
    its PAX header) reach `emit`; `on_done` sees it again once its data is hashed. Only what
    GNU tar's posix format writes is understood; anything else (GNU long names, sparse
    files, global headers) is refused, which keeps our reading and tar's reading of the same
    bytes identical.

    Headers are parsed in place in the chunk; checked bytes are emitted as one slice per
    chunk, not piece by piece, because the per-member cost in Python is what bounds restore
    throughput on trees of many small files. Only a header sequence (PAX header, its
    records, the ustar header) cut by a chunk boundary is copied, into `_held`.
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
        self._held = bytearray()  # a header sequence begun in an earlier chunk, not yet emitted
        self._piece = BLOCK  # length `_held` must reach for the next parsing step
        self._piece_size = BLOCK  # size of the next piece of the header sequence
        self._pax_next = False  # the next piece is the records of a PAX header
        self._pax: dict[str, bytes] | None = None
        self._member: Member | None = None
        self._hasher: Any = None
        self._data_left = 0
        self._pad_left = 0
        self._zero_blocks = 0
        self.ended = False
        self.end_offset = 1 << 62  # emitted bytes up to the end-of-archive blocks
        self.emitted = 0
        self.raw_size = 0

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        view = memoryview(chunk)
        end = len(view)
        self.raw_size += end
        pos = 0
        flushed = 0  # view[:flushed] is emitted (or held)
        sequence_start = -1  # where an unchecked header sequence begins in view, if any
        while pos < end:
            if self._data_left:
                take = min(self._data_left, end - pos)
                if self._hasher is not None:
                    self._hasher.update(view[pos : pos + take])
                self._data_left -= take
                pos += take
                if not self._data_left:
                    self._finish_member()
            elif self._pad_left:
                take = min(self._pad_left, end - pos)
                self._pad_left -= take
                pos += take
            elif self.ended:
                self._trailing(view[pos:])
                end = pos  # trailing zeros are checked, not passed on
            elif self._held:
                take = min(self._piece - len(self._held), end - pos)
                self._held += view[pos : pos + take]
                pos += take
                if len(self._held) == self._piece:
                    piece_start = self._piece - self._piece_size
                    if self._step(memoryview(self._held)[piece_start:]):
                        self._out(self._held)
                        self._held = bytearray()
                        flushed = pos
                        self._mark_end()
                    else:
                        self._piece += self._piece_size
            else:
                if sequence_start < 0:
                    sequence_start = pos
                    self._piece_size = BLOCK
                if end - pos < self._piece_size:
                    break
                stop = pos + self._piece_size
                complete = self._step(view[pos:stop])
                pos = stop
                if complete:
                    sequence_start = -1
                    if self.ended:
                        self._out(view[flushed:pos])
                        flushed = pos
                        self._mark_end()
        if sequence_start >= 0:
            # The sequence runs past this chunk: keep it, pass on what precedes it.
            self._out(view[flushed:sequence_start])
            self._held = bytearray(view[sequence_start:end])
            self._piece = pos - sequence_start + self._piece_size
        elif not self._held:
            self._out(view[flushed:end])

    def _mark_end(self) -> None:
        if self.ended:
            self.end_offset = self.emitted

    def close(self) -> None:
        if not self.ended or self._held or self._pax is not None or self._pax_next:
            name = self._member.name if self._member else "(end)"
            raise UnsafeArchiveError(self.source, name, "is cut short (truncated archive)")
        if self._emit is not None and self.emitted % RECORD:
            self._out(bytes(RECORD - self.emitted % RECORD))

    def _out(self, data: bytes | bytearray | memoryview) -> None:
        if self._emit is not None and len(data):
            self._emit(data)
            self.emitted += len(data)

    def _trailing(self, rest: memoryview) -> None:
        if rest.tobytes().strip(b"\0"):
            raise UnsafeArchiveError(self.source, "(end)", "is followed by trailing data")

    def _step(self, piece: memoryview) -> bool:
        """Parse one piece of a header sequence; True once the sequence is complete.

        Sets `_piece_size` to the size of the next piece when the sequence goes on.
        """
        if self._pax_next:
            self._pax = _parse_pax(self.source, piece.tobytes(), "(PAX header)")
            self._pax_next = False
            self._piece_size = BLOCK
            return False
        block = piece.tobytes()
        if not any(block):
            self._zero_blocks += 1
            self.ended = self._zero_blocks == 2
            self._piece_size = BLOCK
            return self.ended
        if self._zero_blocks:
            raise UnsafeArchiveError(self.source, "(end)", "has a lone zero block mid-stream")
        self._check_block(block)
        if block[156:157] == tarfile.XHDTYPE:
            where = "(PAX header)"
            if self._pax is not None:
                raise UnsafeArchiveError(self.source, where, "follows another PAX header")
            size = self._octal(block, 124, 136)
            if size > 1 << 20:
                raise UnsafeArchiveError(self.source, where, "is oversized")
            self._pax_next = size > 0
            self._pax = None if size else {}
            self._piece_size = padded_size(size) if size else BLOCK
            return False
        member = self._member_from(block)
        if self._on_member is not None:
            self._on_member(member)
        self._pax = None
        self._member = member
        self._data_left = member.size
        self._pad_left = padded_size(member.size) - member.size
        self._hasher = hashlib.sha256() if self._hash_data and member.kind == "file" else None
        if not member.size:
            self._finish_member()
        return True

    def _check_block(self, block: bytes) -> None:
        try:
            checksum = parse_octal(block[148:156])
        except ValueError:
            checksum = -1
        if checksum != sum(block) - sum(block[148:156]) + 256:
            raise UnsafeArchiveError(
                self.source, "(header)", "is not a valid tar header (bad checksum)"
            )
        if block[257:265] != b"ustar\x0000":
            raise UnsafeArchiveError(
                self.source, "(header)", "is not a valid tar header (not POSIX ustar)"
            )

    def _octal(self, block: bytes, start: int, stop: int) -> int:
        try:
            return parse_octal(block[start:stop])
        except ValueError as exc:
            raise UnsafeArchiveError(
                self.source, "(header)", f"is not a valid tar header ({exc})"
            ) from None

    def _member_from(self, block: bytes) -> Member:
        """The member a checked ustar header and the PAX records before it describe.

        Only the fields the member needs are parsed: PAX records override their ustar
        counterparts, and device numbers matter only for devices (tar ignores them
        elsewhere).
        """
        pax = self._pax or {}
        if "path" in pax:
            name = canonical_name(decode_text(pax["path"]))
        else:
            prefix = field_text(block[345:500])
            base = field_text(block[0:100])
            name = canonical_name(f"{prefix}/{base}" if prefix else base)
        type_ = block[156:157]
        kind = TYPE_NAMES.get(type_)
        if kind is None:
            raise UnsafeArchiveError(
                self.source,
                name,
                f"has unsupported type {type_!r} (only files, dirs, "
                "links, char devices and fifos are allowed)",
            )
        octal = self._octal
        member = Member(
            name=name,
            kind=kind,
            mode=octal(block, 100, 108),
            uid=_pax_int(self.source, name, pax, "uid") if "uid" in pax else octal(block, 108, 116),
            gid=_pax_int(self.source, name, pax, "gid") if "gid" in pax else octal(block, 116, 124),
            size=(
                _pax_int(self.source, name, pax, "size")
                if "size" in pax
                else octal(block, 124, 136)
            ),
            mtime=decode_text(pax["mtime"]) if "mtime" in pax else str(octal(block, 136, 148)),
            linkname=(
                decode_text(pax["linkpath"]) if "linkpath" in pax else field_text(block[157:257])
            ),
        )
        if kind in ("chardev", "blockdev"):
            member.devmajor = octal(block, 329, 337)
            member.devminor = octal(block, 337, 345)
        if pax:
            member.xattrs = {
                k[len(_XATTR_PREFIX) :]: v for k, v in pax.items() if k.startswith(_XATTR_PREFIX)
            }
        return member

    def _finish_member(self) -> None:
        member = self._member
        assert member is not None
        if self._hasher is not None:
            member.sha256 = self._hasher.hexdigest()
            self._hasher = None
        if self._on_done is not None:
            self._on_done(member)


def parse_octal(field: bytes) -> int:
    """A ustar number: octal digits, space/NUL padded. Nothing else, as GNU tar reads it.

    Python's int() would also take a sign or underscores, and base-256 is a GNU extension:
    a "-1" size that tar refuses but we read would put the two parsers out of step.
    """
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if not digits:
        return 0
    if not digits.isdigit():
        raise ValueError(f"bad number field {bytes(field)!r}")
    return int(digits, 8)


def field_text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def padded_size(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def decode_text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def _pax_int(source: str, name: str, pax: dict[str, bytes], key: str) -> int:
    value = pax[key]
    if not value.isdigit():  # int() would take signs, spaces and underscores
        raise UnsafeArchiveError(source, name, f"has a malformed PAX {key} record")
    return int(value)


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
        symlinks = self.symlinks
        slash = name.find("/")
        while slash > 0:
            prefix = name[:slash]
            if prefix in symlinks:
                raise self.refuse(name, f"lies below symlink {prefix!r} (would write through it)")
            slash = name.find("/", slash + 1)

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
