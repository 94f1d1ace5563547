"""Streaming validation of archives, on crafted in-memory tar streams (no engine, no disk)."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest

from orchestrator.checkpoints.archive import _TarIndexer
from orchestrator.checkpoints.tarstream import (
    ArchiveError,
    MemberPolicy,
    TarScanner,
    UnsafeArchiveError,
    scan_stream,
)

SOURCE = "snapshot ch5 (a1b2c3)"


def _info(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o644
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def _archive(*members: tuple[tarfile.TarInfo, bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for info, data in members:
            info.size = len(data) if info.type == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buffer.getvalue()


def _file(name: str, data: bytes = b"data", **attrs: object) -> tuple[tarfile.TarInfo, bytes]:
    return _info(name, **attrs), data


def _entry(name: str, kind: bytes, **attrs: object) -> tuple[tarfile.TarInfo, bytes]:
    return _info(name, kind, **attrs), b""


def _refusal(data: bytes, policy: MemberPolicy | None = None) -> str:
    with pytest.raises(UnsafeArchiveError) as caught:
        scan_stream(io.BytesIO(data), policy or MemberPolicy(SOURCE), emit=None)
    return caught.value.message


def test_legitimate_root_filesystem_passes() -> None:
    data = _archive(
        _entry(".", tarfile.DIRTYPE, mode=0o755),
        _entry("usr", tarfile.DIRTYPE),
        _entry("usr/bin", tarfile.DIRTYPE),
        _file("usr/bin/bash", b"#!elf", mode=0o755),
        _file("usr/bin/su", b"su", mode=0o4755),
        _file("usr/bin/wall", b"wall", mode=0o2755, gid=5),
        _entry("usr/bin/sh", tarfile.SYMTYPE, linkname="/bin/bash"),
        _entry("usr/bin/rel", tarfile.SYMTYPE, linkname="../../bin/bash"),
        _entry("usr/bin/bash-hl", tarfile.LNKTYPE, linkname="usr/bin/bash"),
        _entry("bin", tarfile.SYMTYPE, linkname="usr/bin"),
        _entry("tmp", tarfile.DIRTYPE, mode=0o1777),
        _entry("dev", tarfile.DIRTYPE),
        _entry("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        _entry("dev/console", tarfile.CHRTYPE, devmajor=5, devminor=1, mode=0o600),
        _entry("dev/initctl", tarfile.FIFOTYPE),
        _file("home/tester/f", b"x" * 3000, uid=1000, gid=1001),
    )
    members = scan_stream(io.BytesIO(data), MemberPolicy(SOURCE), emit=None)
    by_name = {m.name: m for m in members}
    assert list(by_name)[:3] == [".", "usr", "usr/bin"]
    assert by_name["usr/bin/su"].mode == 0o4755
    assert by_name["usr/bin/sh"].linkname == "/bin/bash"
    assert (by_name["dev/console"].devmajor, by_name["dev/console"].devminor) == (5, 1)
    assert (by_name["home/tester/f"].uid, by_name["home/tester/f"].gid) == (1000, 1001)
    assert by_name["usr/bin/bash"].sha256 == hashlib.sha256(b"#!elf").hexdigest()
    assert by_name["usr/bin/bash-hl"].kind == "hardlink"


def test_file_digest_is_sha256_of_the_data() -> None:
    payload = bytes(range(256)) * 41  # spans several blocks, not a multiple of 512
    members = scan_stream(
        io.BytesIO(_archive(_file("f", payload))), MemberPolicy(SOURCE), emit=None
    )
    assert members[0].sha256 == hashlib.sha256(payload).hexdigest()
    assert members[0].size == len(payload)


def test_dotdot_component_is_refused() -> None:
    data = _archive(_file("usr/../../etc/passwd"))
    assert _refusal(data) == (
        f"{SOURCE}: member 'usr/../../etc/passwd' escapes the tree ('..' component)"
    )


def test_absolute_name_is_refused() -> None:
    assert _refusal(_archive(_file("/etc/passwd"))) == (
        f"{SOURCE}: member '/etc/passwd' escapes the tree (absolute path)"
    )


def test_write_through_symlink_is_refused() -> None:
    data = _archive(_entry("lib", tarfile.SYMTYPE, linkname="/etc"), _file("lib/passwd"))
    assert _refusal(data) == (
        f"{SOURCE}: member 'lib/passwd' lies below symlink 'lib' (would write through it)"
    )


def test_write_through_symlink_of_an_earlier_layer_is_refused() -> None:
    policy = MemberPolicy(SOURCE, symlinks={"usr/lib"})
    assert _refusal(_archive(_file("usr/lib/libc.so")), policy) == (
        f"{SOURCE}: member 'usr/lib/libc.so' lies below symlink 'usr/lib' (would write through it)"
    )


def test_replacing_a_symlink_of_an_earlier_layer_is_refused() -> None:
    policy = MemberPolicy(SOURCE, symlinks={"lib"})
    assert _refusal(_archive(_entry("lib", tarfile.DIRTYPE)), policy) == (
        f"{SOURCE}: member 'lib' would replace a symlink of an earlier layer"
    )


def test_hard_link_outside_is_refused() -> None:
    data = _archive(_entry("evil", tarfile.LNKTYPE, linkname="/etc/shadow"))
    assert _refusal(data) == (
        f"{SOURCE}: member 'evil' is a hard link to '/etc/shadow', "
        "which is not an earlier regular file of the archive"
    )


def test_hard_link_to_a_symlink_or_later_member_is_refused() -> None:
    data = _archive(
        _entry("link", tarfile.SYMTYPE, linkname="/etc/shadow"),
        _entry("evil", tarfile.LNKTYPE, linkname="link"),
    )
    assert _refusal(data) == (
        f"{SOURCE}: member 'evil' is a hard link to 'link', "
        "which is not an earlier regular file of the archive"
    )
    later = _archive(_entry("evil", tarfile.LNKTYPE, linkname="f"), _file("f"))
    assert "member 'evil' is a hard link to 'f'" in _refusal(later)


def test_block_device_is_refused() -> None:
    data = _archive(_entry("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0))
    assert _refusal(data) == f"{SOURCE}: member 'dev/sda' is a block device (8:0), never allowed"


def test_unlisted_char_device_is_refused() -> None:
    data = _archive(_entry("dev/mem", tarfile.CHRTYPE, devmajor=1, devminor=1))
    assert _refusal(data) == (
        f"{SOURCE}: member 'dev/mem' is character device 1:1, not one of the allowed "
        "(console, full, null, ptmx, random, tty, urandom, zero)"
    )


def test_duplicate_member_is_refused() -> None:
    assert _refusal(_archive(_file("a"), _file("a"))) == f"{SOURCE}: member 'a' appears twice"


def test_non_canonical_name_is_refused() -> None:
    assert _refusal(_archive(_file("a//b"))) == (
        f"{SOURCE}: member 'a//b' has a non-canonical name (empty or '.' component)"
    )


def test_gnu_long_name_headers_are_refused() -> None:
    data = _archive(_file("x" * 150), fmt=tarfile.GNU_FORMAT)
    assert _refusal(data) == (
        f"{SOURCE}: member '(header)' is not a valid tar header (not POSIX ustar)"
    )


def test_unknown_pax_record_is_refused() -> None:
    info = _info("sparse")
    info.pax_headers = {"GNU.sparse.major": "1"}
    assert _refusal(_archive((info, b"abc"))) == (
        f"{SOURCE}: member '(PAX header)' has an unsupported PAX record 'GNU.sparse.major'"
    )


def test_pax_path_is_what_gets_checked() -> None:
    # The ustar name field is empty; the PAX path record is what tar would use.
    info = _info("")
    info.pax_headers = {"path": "../../escape"}
    assert _refusal(_archive((info, b"abc"))) == (
        f"{SOURCE}: member '../../escape' escapes the tree ('..' component)"
    )


def test_pax_path_that_disagrees_with_the_ustar_name_is_refused() -> None:
    # tar extracts under the ustar name whenever it drops the PAX header: both must agree.
    info = _info("harmless")
    info.pax_headers = {"path": "other"}
    assert _refusal(_archive((info, b"abc"))) == (
        f"{SOURCE}: member 'other' has a PAX path that disagrees with its ustar name 'harmless'"
    )


def test_size_limit_is_enforced() -> None:
    data = _archive(_file("a", b"x" * 600), _file("b", b"y" * 600))
    assert _refusal(data, MemberPolicy(SOURCE, max_bytes=1000)) == (
        f"{SOURCE}: member 'b' takes the archive past its size limit of 1000 bytes"
    )


def test_truncated_archive_is_refused() -> None:
    data = _archive(_file("a", b"x" * 4000))
    assert _refusal(data[:2048]) == f"{SOURCE}: member 'a' is cut short (truncated archive)"


def test_corrupt_header_checksum_is_refused() -> None:
    data = bytearray(_archive(_file("a")))
    data[0] ^= 0x01
    assert _refusal(bytes(data)) == (
        f"{SOURCE}: member '(header)' is not a valid tar header (bad checksum)"
    )


# Chunk sizes that cut headers, PAX records and data at every kind of boundary.
CHUNK_SIZES = [1, 7, 100, 333, 511, 512, 513, 1000, 4096, 1 << 20]


def _patched(data: bytes, start: int, field: bytes) -> bytes:
    """`data` with its first header's field at `start` replaced and the checksum redone."""
    block = bytearray(data[:512])
    block[start : start + len(field)] = field
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block) + data[512:]


@pytest.mark.parametrize(
    ("field", "shown"),
    [
        (b"-0000000001\0", "-0000000001"),
        (b"0_00000001\0", "0_00000001"),
        (b"\x80" + bytes(10) + b"\x01", "\\x80"),
    ],
)
def test_numbers_tar_would_not_read_are_refused(field: bytes, shown: str) -> None:
    data = _patched(_archive(_file("a", b"x" * 600), fmt=tarfile.USTAR_FORMAT), 124, field)
    message = _refusal(data)
    assert message.startswith(f"{SOURCE}: member '(header)' is not a valid tar header (bad number")
    assert shown in message


def test_pax_numbers_tar_would_not_read_are_refused() -> None:
    info = _info("a")
    info.pax_headers = {"size": "1_0"}
    assert _refusal(_archive((info, b"x" * 10))) == (
        f"{SOURCE}: member '(PAX header)' has a malformed PAX record "
        "(size b'1_0' is not plain decimal digits)"
    )


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
def test_refused_member_never_reaches_the_extractor(chunk: int) -> None:
    evil = _info("harmless-looking")
    evil.pax_headers = {"path": "lib/passwd", "mtime": "1.25"}
    data = _archive(_file("ok", b"fine"), _entry("lib", tarfile.SYMTYPE, linkname="/etc"),
                    (evil, b"root::0:0::/:/bin/sh"))  # fmt: skip
    emitted = bytearray()
    policy = MemberPolicy(SOURCE)
    scanner = TarScanner(SOURCE, on_member=policy.check, emit=emitted.extend)
    with pytest.raises(UnsafeArchiveError) as caught:
        for start in range(0, len(data), chunk):
            scanner.feed(data[start : start + chunk])
    assert caught.value.member == "lib/passwd"
    assert b"lib/passwd" not in emitted  # not even the PAX header naming it
    assert b"root::0:0" not in emitted
    assert bytes(emitted) == data[: len(emitted)]


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
def test_emitted_stream_equals_input_for_a_valid_archive(chunk: int) -> None:
    data = _written_archive()
    emitted = bytearray()
    done: list[str] = []
    scanner = TarScanner(
        SOURCE,
        on_member=MemberPolicy(SOURCE).check,
        on_done=lambda member: done.append(member.name),
        emit=emitted.extend,
    )
    for start in range(0, len(data), chunk):
        scanner.feed(data[start : start + chunk])
    scanner.close()
    end = scanner.end_offset
    assert bytes(emitted[:end]) == data[:end]
    assert not any(data[end:]) and len(data) - end >= 0
    assert len(emitted) % 10240 == 0 and not any(emitted[end:])
    assert done == [m.name for m in scan_stream(io.BytesIO(data), MemberPolicy(SOURCE), emit=None)]
    assert len(done) == 6


def test_trailing_data_after_the_end_is_refused() -> None:
    data = _archive(_file("a")) + b"\x01" * 512
    assert _refusal(data) == f"{SOURCE}: member '(end)' is followed by trailing data"


# --------------------------------------------------------------------------- write-side indexer


def _written_archive() -> bytes:
    """Members like GNU tar's posix output: PAX headers, long names, links, xattrs."""
    long_dir = "usr/share/" + "d" * 120
    regular = _file(f"{long_dir}/file.txt", b"x" * 70_000, pax_headers={"mtime": "1.5"})
    xattr = _file("usr/bin/bash", b"bash", pax_headers={"SCHILY.xattr.user.note": "a\nb=c"})
    link = _entry("usr/bin/bash-hl", tarfile.LNKTYPE, linkname="usr/bin/bash")
    symlink = _entry("bin", tarfile.SYMTYPE, linkname="usr/bin/" + "s" * 110)
    return _archive(
        _entry(".", tarfile.DIRTYPE), regular, _file("empty", b""), xattr, link, symlink
    )


@pytest.mark.parametrize("chunk", [1, 7, 511, 512, 513, 4096, 1 << 20])
def test_indexer_agrees_with_the_validating_scanner(chunk: int) -> None:
    data = _written_archive()
    members = scan_stream(io.BytesIO(data), MemberPolicy(SOURCE), emit=None)
    indexer = _TarIndexer()
    for start in range(0, len(data), chunk):
        indexer.feed(data[start : start + chunk])
    indexer.close()
    assert indexer.raw_size == len(data)
    expected = [(m.name, m.kind, m.size, m.linkname, m.sha256) for m in members]
    found = [(m.name, m.kind, m.size, m.linkname, m.digest) for m in indexer.members]
    assert found == expected
    assert found[1][4] == hashlib.sha256(b"x" * 70_000).hexdigest()


def test_indexer_refuses_what_tar_posix_never_writes() -> None:
    indexer = _TarIndexer()
    with pytest.raises(ArchiveError):
        indexer.feed(
            _archive(_file("old/v7"), fmt=tarfile.GNU_FORMAT)[:512].replace(b"ustar", b"xxxxx")
        )
    cut = _TarIndexer()
    cut.feed(_written_archive()[:2048])
    with pytest.raises(ArchiveError):
        cut.close()
