"""Reading untrusted tar streams: a block-by-block ustar/PAX parser and the member rules.

An archive is never trusted, not even one this tool wrote. `TarScanner` parses the stream
block by block, and `MemberPolicy` refuses a member before a single byte of it (or of its PAX
header) is passed on, so whatever consumes the stream (the extractors in `extract`) only ever
sees members that were checked.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
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
# What GNU tar itself writes in a numeric ustar field: optional leading blanks, octal digits,
# then NULs or blanks; or nothing but NULs (zero). tar also reads a leading NUL, base-256,
# base-64 and signs, and Python's int() reads still other forms: all of those are refused.
_OCTAL_FIELD = re.compile(rb" *([0-7]+)[ \0]*|\0*")
# A PAX record as GNU tar writes it: "LEN key=value\n", LEN in plain decimal digits.
_PAX_LENGTH = re.compile(rb"[1-9][0-9]{0,8}")
# Printable ASCII but blank and '=': tar ends a keyword at '=' and reads it as a C string.
_PAX_KEY = re.compile(rb"[!-<>-~]{1,200}")
_PAX_NUMBER = re.compile(rb"[0-9]{1,20}")
_PAX_TIME = re.compile(rb"-?[0-9]{1,20}(\.[0-9]{1,9})?")
_PAX_NUMBERS = frozenset({"size", "uid", "gid"})
_PAX_TIMES = frozenset({"mtime", "atime", "ctime"})
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
        new_hasher: Callable[[], Any] = hashlib.sha256,
    ) -> None:
        self.source = source
        self._new_hasher = new_hasher  # `Member.sha256` then holds this algorithm's digest
        self._on_member = on_member
        self._on_done = on_done
        self._emit = emit
        self._hash_data = hash_data
        self._held = bytearray()  # a header sequence begun in an earlier chunk, not yet emitted
        self._piece = BLOCK  # length `_held` must reach for the next parsing step
        self._piece_size = BLOCK  # size of the next piece of the header sequence
        self._pax_next = False  # the next piece is the records of a PAX header
        self._pax: dict[str, bytes] | None = None
        self._pax_size = 0
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
            # Only the header's declared size holds records: tar never reads the padding.
            records = piece[: self._pax_size].tobytes()
            self._pax = _parse_pax(self.source, records, "(PAX header)")
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
            self._pax_size = size
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
        self._hasher = self._new_hasher() if self._hash_data and member.kind == "file" else None
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
        raw_name, raw_link = self._names(block, pax)
        name = canonical_name(decode_text(raw_name))
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
            linkname=decode_text(raw_link),
        )
        if raw_name.endswith(b"/") and kind != "dir":
            # tar makes a directory of a "file" whose name ends in '/'.
            raise UnsafeArchiveError(self.source, name, f"is a {kind} with a directory's name")
        if kind in ("chardev", "blockdev"):
            member.devmajor = octal(block, 329, 337)
            member.devminor = octal(block, 337, 345)
        if pax:
            member.xattrs = {
                k[len(_XATTR_PREFIX) :]: v for k, v in pax.items() if k.startswith(_XATTR_PREFIX)
            }
        return member

    def _names(self, block: bytes, pax: dict[str, bytes]) -> tuple[bytes, bytes]:
        """The member's name and link target exactly as GNU tar reads them.

        tar takes a PAX record over the ustar field and reads both as C strings, so a NUL
        byte ends them there. Anything tar and this parser could read differently is
        refused: a NUL byte, an empty name, and a ustar field that is not the start of the
        PAX value (GNU tar writes the PAX value's first bytes there; a different one would
        be what tar extracts if it ever ignored the PAX header).
        """
        prefix = _field(self.source, block[345:500], "name")
        base = _field(self.source, block[0:100], "name", prefix)
        ustar_name = prefix + b"/" + base if prefix else base
        ustar_link = _field(self.source, block[157:257], "link target", ustar_name)
        name = pax.get("path", ustar_name)
        link = pax.get("linkpath", ustar_link)
        shown = decode_text(name)
        if b"\0" in name:
            raise UnsafeArchiveError(self.source, shown, "has a NUL byte in its name")
        if b"\0" in link:
            raise UnsafeArchiveError(self.source, shown, "has a NUL byte in its link target")
        if not name:
            raise UnsafeArchiveError(self.source, "(header)", "has an empty name")
        if not name.startswith(ustar_name):
            raise UnsafeArchiveError(
                self.source, shown, f"has a PAX path that disagrees with its ustar name "
                f"{decode_text(ustar_name)!r}"
            )  # fmt: skip
        if not link.startswith(ustar_link):
            raise UnsafeArchiveError(
                self.source, shown, f"has a PAX link target that disagrees with its ustar one "
                f"{decode_text(ustar_link)!r}"
            )  # fmt: skip
        return name, link

    def _finish_member(self) -> None:
        member = self._member
        assert member is not None
        if self._hasher is not None:
            member.sha256 = self._hasher.hexdigest()
            self._hasher = None
        if self._on_done is not None:
            self._on_done(member)


def parse_octal(field: bytes) -> int:
    """A ustar number, only in the form GNU tar writes it (`_OCTAL_FIELD`).

    Any other form is one tar and Python might read differently: tar skips a leading NUL
    and reads base-256, Python's int() takes signs and underscores. A size read differently
    puts the two parsers out of step, and tar would then take data for headers never checked.
    """
    match = _OCTAL_FIELD.fullmatch(field)
    if match is None:
        raise ValueError(f"bad number field {bytes(field)!r}")
    digits = match.group(1)
    return int(digits, 8) if digits else 0


def field_text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _field(source: str, field: bytes, what: str, member: bytes = b"") -> bytes:
    """A ustar text field up to its NUL; anything but NULs after it is refused."""
    text, _, rest = field.partition(b"\0")
    if rest.strip(b"\0"):
        shown = decode_text(member or text)
        raise UnsafeArchiveError(source, shown, f"has bytes after the NUL ending its {what}")
    return text


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
    """PAX records ("LEN key=value\\n") read exactly as GNU tar reads them, or refused.

    tar stops at the first record it cannot read and drops it and every record after it,
    so the ustar fields apply instead: every record must be one tar reads whole, and the
    records must fill the header exactly. Keys are allowlisted; a repeated key (tar keeps
    the last) and a value tar would read differently (as a C string, or a number with a
    sign or spaces) are refused.
    """
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 10)
        digits = data[pos:space] if space > pos else data[pos : pos + 10]
        if space < 0 or not _PAX_LENGTH.fullmatch(digits):
            raise _malformed(source, where, f"length {digits!r} is not plain decimal digits")
        end = pos + int(digits)
        if end > len(data) or data[end - 1 : end] != b"\n":
            raise _malformed(source, where, "its length does not end at a newline")
        key_raw, equals, value = data[space + 1 : end - 1].partition(b"=")
        if not equals or not _PAX_KEY.fullmatch(key_raw):
            raise _malformed(source, where, f"key {key_raw!r} is not a plain keyword")
        key = key_raw.decode("ascii")
        if key not in _ALLOWED_PAX_KEYS and not key.startswith(_XATTR_PREFIX):
            raise UnsafeArchiveError(source, where, f"has an unsupported PAX record {key!r}")
        if key in records:
            raise UnsafeArchiveError(source, where, f"repeats the PAX record {key!r}")
        _check_pax_value(source, where, key, value)
        records[key] = value
        pos = end
    return records


def _check_pax_value(source: str, where: str, key: str, value: bytes) -> None:
    # path and linkpath are checked with the member (the refusal names it).
    if key in _PAX_NUMBERS and not _PAX_NUMBER.fullmatch(value):
        raise _malformed(source, where, f"{key} {value[:40]!r} is not plain decimal digits")
    if key in _PAX_TIMES and not _PAX_TIME.fullmatch(value):
        raise _malformed(source, where, f"{key} {value[:40]!r} is not a plain time")
    if key in ("uname", "gname") and b"\0" in value:
        raise _malformed(source, where, f"{key} holds a NUL byte")


def _malformed(source: str, where: str, detail: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(source, where, f"has a malformed PAX record ({detail})")


# --------------------------------------------------------------------------- member policy


class ExtractedTree:
    """The symlinks of the directory being extracted into, as the checks must know them.

    Seeded by walking the directory, then kept up to date from every member actually passed
    to the extractor and every deletion, layer after layer: never from a manifest, which
    could leave out a symlink an archive did create. The layers of one delta chain share one.
    """

    def __init__(self, symlinks: Iterable[str] = ()) -> None:
        self.symlinks = set(symlinks)

    @classmethod
    def walk(cls, root: Path) -> ExtractedTree:
        """The symlinks already under `root` (none in a fresh staging directory)."""
        found: list[str] = []
        for directory, dirs, files in os.walk(root):
            relative = os.path.relpath(directory, root)
            for name in dirs + files:
                if os.path.islink(os.path.join(directory, name)):
                    found.append(name if relative == "." else f"{relative}/{name}")
        return cls(found)

    def forget(self, paths: Iterable[str]) -> None:
        """`paths` were deleted: so were they and every symlink below them."""
        gone = set(paths)
        if not gone:
            return
        self.symlinks -= {
            link for link in self.symlinks
            if any(prefix in gone for prefix in self_and_parents(link))
        }  # fmt: skip


def self_and_parents(path: str) -> Iterable[str]:
    """`a/b/c`, `a/b`, `a`."""
    yield path
    slash = path.rfind("/")
    while slash > 0:
        path = path[:slash]
        yield path
        slash = path.rfind("/")


class MemberPolicy:
    """The rules every member must pass before it reaches the extractor.

    `tree` holds the symlinks already present where the archive is extracted (earlier layers
    of a delta chain, shared with their policies), so no layer can write through them;
    `symlinks` seeds a fresh one instead.
    """

    def __init__(
        self,
        source: str,
        *,
        symlinks: Iterable[str] = (),
        tree: ExtractedTree | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.source = source
        self.tree = tree if tree is not None else ExtractedTree(symlinks)
        self.max_bytes = max_bytes
        self.total = 0
        self._seen: set[str] = set()
        self._regular: set[str] = set()

    @property
    def symlinks(self) -> set[str]:
        return self.tree.symlinks

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
        if "\0" in name:
            raise self.refuse(name, "has a NUL byte in its name")
        if name.startswith("/"):
            raise self.refuse(name, "escapes the tree (absolute path)")
        parts = name.split("/")
        if ".." in parts:
            raise self.refuse(name, "escapes the tree ('..' component)")
        if name != "." and ("" in parts or "." in parts):
            raise self.refuse(name, "has a non-canonical name (empty or '.' component)")

    def _check_parents(self, name: str) -> None:
        symlink = self._symlink_above(name)
        if symlink is not None:
            raise self.refuse(name, f"lies below symlink {symlink!r} (would write through it)")

    def _symlink_above(self, name: str) -> str | None:
        symlinks = self.symlinks
        slash = name.find("/")
        while slash > 0:
            prefix = name[:slash]
            if prefix in symlinks:
                return prefix
            slash = name.find("/", slash + 1)
        return None

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
        if kind in ("symlink", "hardlink") and "\0" in member.linkname:
            raise self.refuse(name, "has a NUL byte in its link target")
        if kind == "hardlink":
            self._check_hardlink(name, member.linkname)

    def _check_hardlink(self, name: str, linkname: str) -> None:
        target = canonical_name(linkname)
        if target not in self._regular:
            raise self.refuse(
                name,
                f"is a hard link to {linkname!r}, "
                "which is not an earlier regular file of the archive",
            )
        # link() follows symlinks on the way to its target: one laid since would lead out.
        symlink = self._symlink_above(target)
        if symlink is not None:
            raise self.refuse(
                name,
                f"is a hard link to {linkname!r}, below symlink {symlink!r} "
                "(would link through it)",
            )


def scan_stream(
    stream: IO[bytes],
    policy: MemberPolicy,
    *,
    emit: Callable[[bytes | bytearray | memoryview], Any] | None,
    new_hasher: Callable[[], Any] = hashlib.sha256,
) -> list[Member]:
    """Validate an uncompressed tar stream, passing checked bytes to `emit`; return members."""
    members: list[Member] = []
    scanner = TarScanner(
        policy.source,
        on_member=policy.check,
        on_done=members.append,
        emit=emit,
        new_hasher=new_hasher,
    )
    while chunk := stream.read(CHUNK):
        scanner.feed(chunk)
    scanner.close()
    return members
