"""Archives GNU tar and the validator could read differently are refused before any byte of
them reaches tar. Each case is laid out byte by byte (see tarcraft)."""

from __future__ import annotations

import io

import pytest

from orchestrator.checkpoints.extract import Layer, check_layer
from orchestrator.checkpoints.tarstream import (
    ExtractedTree,
    MemberPolicy,
    UnsafeArchiveError,
    scan_stream,
)
from tests.security.tarcraft import BLOCK, end, header, member, padded, pax, record

SOURCE = "snapshot ch5 (a1b2c3)"


def _with_field(block: bytes, start: int, value: bytes) -> bytes:
    """`block` with one field replaced and its checksum recomputed."""
    raw = bytearray(block)
    raw[start : start + len(value)] = value
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % sum(raw)
    return bytes(raw)


def _refusal(stream: bytes, policy: MemberPolicy | None = None) -> str:
    emitted = bytearray()
    with pytest.raises(UnsafeArchiveError) as caught:
        scan_stream(io.BytesIO(stream), policy or MemberPolicy(SOURCE), emit=emitted.extend)
    assert b"EVIL" not in emitted
    return caught.value.message.removeprefix(f"{SOURCE}: ")


def _pax_file(records: bytes, ustar_name: bytes = b"f") -> bytes:
    return pax(records) + member(ustar_name, data=b"EVIL") + end()


CASES = [
    pytest.param(
        _pax_file(b" 13 path=ab\n"),
        "member '(PAX header)' has a malformed PAX record "
        "(length b' 13 path=a' is not plain decimal digits)",
        id="length-with-leading-blank",
    ),
    pytest.param(
        _pax_file(b"013 path=fa\n"),
        "member '(PAX header)' has a malformed PAX record "
        "(length b'013' is not plain decimal digits)",
        id="length-with-leading-zero",
    ),
    pytest.param(
        _pax_file(b"1_2 path=f\n"),
        "member '(PAX header)' has a malformed PAX record "
        "(length b'1_2' is not plain decimal digits)",
        id="length-with-underscore",
    ),
    pytest.param(
        _pax_file(b"12\tpath=fa\n"),
        "member '(PAX header)' has a malformed PAX record "
        "(length b'12\\tpath=fa' is not plain decimal digits)",
        id="tab-after-length",
    ),
    pytest.param(
        _pax_file(b"11  path=f\n"),
        "member '(PAX header)' has a malformed PAX record (key b' path' is not a plain keyword)",
        id="two-blanks-after-length",
    ),
    pytest.param(
        _pax_file(b"19 pa\0th=fffffffff\n"),
        "member '(PAX header)' has a malformed PAX record "
        "(key b'pa\\x00th' is not a plain keyword)",
        id="nul-in-keyword",
    ),
    pytest.param(
        _pax_file(b"30 path=f\n"),
        "member '(PAX header)' has a malformed PAX record (its length does not end at a newline)",
        id="length-past-the-header",
    ),
    pytest.param(
        _pax_file(record(b"size", b"+4")),
        "member '(PAX header)' has a malformed PAX record (size b'+4' is not plain decimal digits)",
        id="size-with-sign",
    ),
    pytest.param(
        _pax_file(record(b"uid", b"0\0")),
        "member '(PAX header)' has a malformed PAX record "
        "(uid b'0\\x00' is not plain decimal digits)",
        id="uid-with-nul",
    ),
    pytest.param(
        _pax_file(record(b"mtime", b" 1")),
        "member '(PAX header)' has a malformed PAX record (mtime b' 1' is not a plain time)",
        id="mtime-with-blank",
    ),
    pytest.param(
        _pax_file(record(b"path", b"f") + record(b"path", b"f")),
        "member '(PAX header)' repeats the PAX record 'path'",
        id="repeated-record",
    ),
    pytest.param(
        _pax_file(record(b"path", b"f\0/../x")),
        "member 'f\\x00/../x' has a NUL byte in its name",
        id="nul-in-pax-path",
    ),
    pytest.param(
        pax(record(b"linkpath", b"target\0x")) + member(b"l", b"2", linkname=b"target") + end(),
        "member 'l' has a NUL byte in its link target",
        id="nul-in-pax-linkpath",
    ),
    pytest.param(
        _pax_file(record(b"path", b"decoy"), ustar_name=b"x/victim"),
        "member 'decoy' has a PAX path that disagrees with its ustar name 'x/victim'",
        id="pax-path-disagrees-with-ustar-name",
    ),
    pytest.param(
        pax(record(b"linkpath", b"/etc/passwd"))
        + member(b"l", b"2", linkname=b"/etc/shadow")
        + end(),
        "member 'l' has a PAX link target that disagrees with its ustar one '/etc/shadow'",
        id="pax-linkpath-disagrees-with-ustar-linkname",
    ),
    pytest.param(
        pax(b"")[:BLOCK] + member(b"a", data=b"EVIL") + end(),
        None,
        id="empty-pax-header-is-fine",
    ),
    pytest.param(
        member(b"f\0x/victim", data=b"EVIL") + end(),
        "member 'f' has bytes after the NUL ending its name",
        id="bytes-after-nul-in-ustar-name",
    ),
    pytest.param(
        member(b"l", b"2", linkname=b"a\0/etc") + end(),
        "member 'l' has bytes after the NUL ending its link target",
        id="bytes-after-nul-in-ustar-linkname",
    ),
    pytest.param(
        member(b"x/", b"0", data=b"EVIL") + end(),
        "member 'x' is a file with a directory's name",
        id="file-with-trailing-slash",
    ),
    pytest.param(
        member(b"", b"5") + end(),
        "member '(header)' has an empty name",
        id="empty-name",
    ),
    pytest.param(
        header(b"././@LongLink", b"L", size=9) + padded(b"x/victim\0") + member(b"f") + end(),
        "member '@LongLink' has unsupported type b'L' (only files, dirs, links, char "
        "devices and fifos are allowed)",
        id="gnu-long-name",
    ),
    pytest.param(
        header(b"././@LongLink", b"K", size=9) + padded(b"/etc/pw\0") + end(),
        "member '@LongLink' has unsupported type b'K' (only files, dirs, links, char "
        "devices and fifos are allowed)",
        id="gnu-long-link",
    ),
    pytest.param(
        header(b"g", b"g", size=12) + padded(b"12 path=ab\n") + member(b"f") + end(),
        "member 'g' has unsupported type b'g' (only files, dirs, links, char devices and "
        "fifos are allowed)",
        id="pax-global-header",
    ),
    pytest.param(
        pax(record(b"path", b"f")) + pax(record(b"path", b"x")) + member(b"f") + end(),
        "member '(PAX header)' follows another PAX header",
        id="two-pax-headers",
    ),
]


@pytest.mark.parametrize(("stream", "reason"), CASES)
def test_archives_read_differently_by_tar_are_refused(stream: bytes, reason: str | None) -> None:
    if reason is None:
        members = scan_stream(io.BytesIO(stream), MemberPolicy(SOURCE), emit=None)
        assert [m.name for m in members] == ["a"]
    else:
        assert _refusal(stream) == reason


def test_records_in_the_padding_of_a_pax_header_are_not_read() -> None:
    # tar reads only the header's declared size: a record hidden in its padding would be
    # seen by a parser that reads the whole block, and by tar not at all.
    declared = record(b"mtime", b"1")
    hidden = declared + record(b"path", b"decoy")
    stream = header(b"PaxHeaders/f", b"x", size=len(declared)) + padded(hidden)
    stream += member(b"x/victim", data=b"EVIL") + end()
    policy = MemberPolicy(SOURCE, symlinks={"x"})
    assert (
        _refusal(stream, policy)
        == "member 'x/victim' lies below symlink 'x' (would write through it)"
    )


@pytest.mark.parametrize(
    ("field", "reason"),
    [
        (b"\x0000000000017", "is not a valid tar header (bad number field"),
        (b"\x80" + bytes(10) + b"\x04", "is not a valid tar header (bad number field"),
        (b"+0000000004\0", "is not a valid tar header (bad number field"),
        (b"           \0", "is not a valid tar header (bad number field"),
        (b"00000000004x", "is not a valid tar header (bad number field"),
    ],
    ids=["leading-nul", "base-256", "base-64-sign", "only-blanks", "garbage-after-digits"],
)
def test_size_fields_tar_reads_differently_are_refused(field: bytes, reason: str) -> None:
    # With a leading NUL, tar reads 017 (15 bytes of data), Python's split reads 0: the two
    # would then disagree about where the next header starts.
    block = _with_field(header(b"f", b"0"), 124, field)
    stream = block + padded(b"EVIL" * 4) + end()
    assert _refusal(stream).startswith(f"member '(header)' {reason}")


def test_hard_link_through_a_symlink_laid_after_its_target_is_refused() -> None:
    # `d` is a directory of an earlier layer; this one writes d/f, turns d into a symlink
    # to somewhere outside, then links to d/f: link() would follow the symlink.
    stream = (
        member(b"d/f", data=b"EVIL")
        + member(b"d", b"2", linkname=b"/etc")
        + member(b"h", b"1", linkname=b"d/f")
        + end()
    )
    assert _refusal(stream) == (
        "member 'h' is a hard link to 'd/f', below symlink 'd' (would link through it)"
    )


def test_symlinks_carry_over_layers_and_are_forgotten_with_what_deletes_them() -> None:
    tree = ExtractedTree()
    first = member(b"d", b"5") + member(b"d/s", b"2", linkname=b"/etc") + end()
    check_layer(Layer([first], MemberPolicy("l0", tree=tree)))
    assert tree.symlinks == {"d/s"}
    below = member(b"d/s/passwd", data=b"EVIL") + end()
    with pytest.raises(UnsafeArchiveError) as caught:
        check_layer(Layer([below], MemberPolicy("l1", tree=tree)))
    assert (
        caught.value.message
        == "l1: member 'd/s/passwd' lies below symlink 'd/s' (would write through it)"
    )
    # Deleting `d` deletes the symlink below it: a later layer may make d/s a directory.
    again = member(b"d", b"5") + member(b"d/s", b"5") + member(b"d/s/f", data=b"ok") + end()
    check_layer(Layer([again], MemberPolicy("l2", tree=tree), delete_before=["d"]))
    assert tree.symlinks == set()
