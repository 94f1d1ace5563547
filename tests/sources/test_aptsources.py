"""Reading the machine's apt sources (both formats) and rendering their deb-src twins."""

from __future__ import annotations

from pathlib import Path

from orchestrator.sources import aptsources
from orchestrator.sources.aptsources import AptEntry
from tests.helpers import apt_root
from tests.samples import DEB822, DEB822_SRC

ONE_LINE = """\
# deb cdrom:[Debian GNU/Linux 12.5.0 _Bookworm_]/ bookworm main
deb-src http://src.example.org/debian bookworm main
deb [arch=amd64 signed-by=/etc/k.gpg] http://ftp.example.org/debian/ bookworm main contrib
deb http://security.example.org/debian-security bookworm-security main # the fixes
"""


# --------------------------------------------------------------------------- deb822


def test_deb822_entries_keep_fields_in_order() -> None:
    first, security, src, disabled = aptsources.parse_deb822(DEB822)
    assert first == AptEntry(
        style="deb822",
        types=("deb",),
        uris=("http://deb.example.org/debian",),
        suites=("bookworm", "bookworm-updates"),
        components=("main",),
        fields=(
            ("Types", "deb"),
            ("URIs", "http://deb.example.org/debian"),
            ("Suites", "bookworm bookworm-updates"),
            ("Components", "main"),
            ("Signed-By", "/usr/share/keyrings/debian-archive-keyring.gpg"),
        ),
    )
    assert security.suites == ("bookworm-security",)
    assert src.types == ("deb-src",) and not src.is_deb
    assert not disabled.enabled and not disabled.is_deb


def test_deb822_pairs_skip_disabled_and_source_only_stanzas() -> None:
    assert aptsources.deb_pairs(aptsources.parse_deb822(DEB822)) == [
        ("http://deb.example.org/debian", "bookworm"),
        ("http://deb.example.org/debian", "bookworm-updates"),
        ("http://deb.example.org/debian-security", "bookworm-security"),
    ]


def test_deb822_continuation_lines_and_case_insensitive_names() -> None:
    text = (
        "types: deb deb-src\nURIs:\n http://a.example/debian/\n http://b.example/debian\n"
        "Suites: trixie\nENABLED: yes\n"
    )
    (entry,) = aptsources.parse_deb822(text)
    assert entry.uris == ("http://a.example/debian/", "http://b.example/debian")
    assert aptsources.deb_pairs([entry]) == [
        ("http://a.example/debian", "trixie"),
        ("http://b.example/debian", "trixie"),
    ]


def test_deb822_comments_and_blank_lines_between_stanzas() -> None:
    text = (
        "# leading comment\n\n\n"
        "Types: deb\n#inside\n   # indented comment\nURIs: http://m/\nSuites: s\n"
        "  \n\t\n"
        "Types: deb\nURIs: http://n/\nSuites: t\n# trailing\n"
    )
    entries = aptsources.parse_deb822(text)
    assert [e.uris for e in entries] == [("http://m/",), ("http://n/",)]
    assert [name for name, _ in entries[0].fields] == ["Types", "URIs", "Suites"]


def test_deb822_src_stanzas() -> None:
    assert aptsources.src_deb822(aptsources.parse_deb822(DEB822)) == DEB822_SRC


def test_deb822_src_keeps_multiline_signed_by_and_both_types() -> None:
    text = (
        "Types: deb deb-src\nURIs: http://m/\nSuites: s\nComponents: c\nSigned-By:\n key1\n key2\n"
    )
    out = aptsources.src_deb822(aptsources.parse_deb822(text))
    assert out == (
        "Types: deb-src\nURIs: http://m/\nSuites: s\nComponents: c\nSigned-By: \n key1\n key2\n"
    )


def test_deb822_src_of_nothing_is_empty() -> None:
    assert aptsources.src_deb822([]) == ""
    assert aptsources.src_deb822(aptsources.parse_deb822("# only a comment\n")) == ""


# --------------------------------------------------------------------------- one-line


def test_one_line_entries() -> None:
    src, ftp, security = aptsources.parse_one_line(ONE_LINE)  # the comment is no entry
    assert src.types == ("deb-src",) and not src.is_deb
    assert ftp == AptEntry(
        style="one-line",
        types=("deb",),
        uris=("http://ftp.example.org/debian/",),
        suites=("bookworm",),
        components=("main", "contrib"),
        options="[arch=amd64 signed-by=/etc/k.gpg]",
        line="deb [arch=amd64 signed-by=/etc/k.gpg] http://ftp.example.org/debian/ bookworm "
        "main contrib",
    )
    assert security.components == ("main",)  # the inline comment is not a component


def test_one_line_pairs_strip_trailing_slash() -> None:
    assert aptsources.deb_pairs(aptsources.parse_one_line(ONE_LINE)) == [
        ("http://ftp.example.org/debian", "bookworm"),
        ("http://security.example.org/debian-security", "bookworm-security"),
    ]


def test_one_line_options_with_spaces() -> None:
    (entry,) = aptsources.parse_one_line(
        "deb [ arch=amd64 signed-by=/k.gpg ] http://m.example.org/debian sid main"
    )
    assert entry.options == "[ arch=amd64 signed-by=/k.gpg ]"
    assert aptsources.deb_pairs([entry]) == [("http://m.example.org/debian", "sid")]


def test_one_line_cdrom_uri_with_spaces_is_one_word() -> None:
    (entry,) = aptsources.parse_one_line(
        "deb cdrom:[Debian GNU/Linux 12.5.0 _Bookworm_]/ bookworm main\n"
    )
    assert entry.uris == ("cdrom:[Debian GNU/Linux 12.5.0 _Bookworm_]/",)
    assert entry.suites == ("bookworm",)


def test_one_line_tabs_and_malformed_lines() -> None:
    entries = aptsources.parse_one_line(
        "deb\thttp://t.example/debian\tbookworm-updates main\n"
        "deb http://only-a-uri.example/debian\n"
        "deb [arch=amd64 http://unclosed.example/debian sid main\n"
        "debx http://x/ sid main\n"
        "rpm http://y/ sid main\n"
    )
    assert aptsources.deb_pairs(entries) == [("http://t.example/debian", "bookworm-updates")]


def test_one_line_src_lines() -> None:
    text = (
        "# comment\n"
        "deb http://deb.example.org/debian bookworm main contrib\n"
        "deb [signed-by=/k.gpg arch=amd64] http://x.example/debian bookworm-updates main\n"
        "deb-src http://deb.example.org/debian bookworm main\n"
        "#deb http://commented.example/debian bookworm main\n"
    )
    assert aptsources.src_one_line(aptsources.parse_one_line(text)) == (
        "deb-src http://deb.example.org/debian bookworm main contrib\n"
        "deb-src [signed-by=/k.gpg arch=amd64] http://x.example/debian bookworm-updates main\n"
    )


# --------------------------------------------------------------------------- the machine


def test_machine_entries_in_apt_order(tmp_path: Path) -> None:
    root = apt_root(
        tmp_path,
        {
            "sources.list": "deb http://main.example/debian bookworm main\n",
            "sources.list.d/b.sources": "Types: deb\nURIs: http://b.example/debian\nSuites: s\n",
            "sources.list.d/a.list": "deb http://a.example/debian s main\n",
            "sources.list.d/c.list.disabled": "deb http://c.example/debian s main\n",
            "sources.list.d/d.sources.save": "Types: deb\nURIs: http://d/\nSuites: s\n",
        },
    )
    (root / "etc" / "apt" / "sources.list.d" / "dir.list").mkdir()
    entries = aptsources.machine_entries(root)
    assert [e.uris[0] for e in entries] == [
        "http://main.example/debian",
        "http://a.example/debian",
        "http://b.example/debian",
    ]
    assert entries == aptsources.read_entries(root / "etc" / "apt")
    assert aptsources.src_one_line(entries) == (
        "deb-src http://main.example/debian bookworm main\ndeb-src http://a.example/debian s main\n"
    )
    assert aptsources.src_deb822(entries) == (
        "Types: deb-src\nURIs: http://b.example/debian\nSuites: s\n"
    )


def test_machine_entries_tolerate_bad_bytes_and_missing_config(tmp_path: Path) -> None:
    assert aptsources.machine_entries(tmp_path) == []
    path = tmp_path / "etc" / "apt" / "sources.list"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"# caf\xe9\ndeb http://m.example/debian bookworm main\n")
    assert aptsources.deb_pairs(aptsources.machine_entries(tmp_path)) == [
        ("http://m.example/debian", "bookworm")
    ]
