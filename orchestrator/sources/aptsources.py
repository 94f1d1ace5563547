"""The machine's apt sources, read once: `sources.list`, `sources.list.d/*.list` and `*.sources`.

Both formats become `AptEntry` values in the order apt reads them. An entry keeps what its
callers need: the types, URIs, suites and components, plus everything else as written (the
`[...]` options of a one-line entry, every field of a deb822 stanza in order, continuation
lines such as a multi-line `Signed-By` included), so `deb-src` twins can be rendered from it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ETC_APT = Path("/etc/apt")

Style = Literal["one-line", "deb822"]

# A one-line word: apt groups `[...]` and `"..."`, as in `cdrom:[Debian GNU/Linux 12]/`.
_WORD = re.compile(r'(?:\[[^\]]*\]|"[^"]*"|[^\s\["])+')


@dataclass(frozen=True)
class AptEntry:
    """One one-line `deb`/`deb-src` line or one deb822 stanza."""

    style: Style
    types: tuple[str, ...]
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    #: One-line: the `[...]` options as written ("" if none); deb822: "".
    options: str = ""
    #: deb822: every field as written, in order, (name, value); continuation lines keep their
    #: newline and indentation. One-line: ().
    fields: tuple[tuple[str, str], ...] = ()
    #: One-line: the line as written (stripped); deb822: "".
    line: str = ""
    #: deb822 `Enabled: no` makes this False; one-line entries are always enabled.
    enabled: bool = True

    @property
    def is_deb(self) -> bool:
        """An enabled entry apt fetches binary packages from."""
        return self.enabled and "deb" in self.types


def parse_one_line(text: str) -> list[AptEntry]:
    """Entries of the classic `sources.list` format: `TYPE [options] URI SUITE COMPONENT...`."""
    entries: list[AptEntry] = []
    for raw in text.splitlines():
        line = raw.strip()
        body = line.split("#", 1)[0].strip()
        kind, *tail = body.split(None, 1) or [""]
        if kind not in ("deb", "deb-src"):
            continue
        rest = tail[0] if tail else ""
        options = ""
        if rest.startswith("["):
            # Options may contain spaces: `[ arch=amd64 signed-by=... ]`.
            end = rest.find("]")
            if end < 0:
                continue
            options, rest = rest[: end + 1], rest[end + 1 :]
        words = _WORD.findall(rest)
        if len(words) < 2:
            continue
        entries.append(
            AptEntry(
                style="one-line",
                types=(kind,),
                uris=(words[0],),
                suites=(words[1],),
                components=tuple(words[2:]),
                options=options,
                line=line,
            )
        )
    return entries


def stanzas(text: str) -> list[list[tuple[str, str]]]:
    """deb822 stanzas as (name, value) lists; comment lines neither count nor separate."""
    found: list[list[tuple[str, str]]] = []
    fields: list[tuple[str, str]] = []
    for raw in [*text.splitlines(), ""]:
        if raw.lstrip().startswith("#"):
            continue
        if not raw.strip():
            if fields:
                found.append(fields)
            fields = []
        elif raw[0] in " \t":
            if fields:  # continuation line (multi-line Signed-By)
                name, value = fields[-1]
                fields[-1] = (name, value + "\n" + raw)
        elif ":" in raw:
            name, value = raw.split(":", 1)
            fields.append((name.strip(), value.strip()))
    return found


def parse_deb822(text: str) -> list[AptEntry]:
    """Entries of the deb822 `*.sources` format (stanzas of `Types:`, `URIs:`, `Suites:`...)."""
    entries: list[AptEntry] = []
    for fields in stanzas(text):
        # Field names are case-insensitive; the last occurrence wins.
        by_name = {name.lower(): value for name, value in fields}
        entries.append(
            AptEntry(
                style="deb822",
                types=tuple(by_name.get("types", "").split()),
                uris=tuple(by_name.get("uris", "").split()),
                suites=tuple(by_name.get("suites", "").split()),
                components=tuple(by_name.get("components", "").split()),
                fields=tuple(fields),
                enabled=by_name.get("enabled", "yes").strip().lower() != "no",
            )
        )
    return entries


def read_entries(etc_apt: Path = ETC_APT) -> list[AptEntry]:
    """Every entry under ETC_APT, in the order apt reads them: `sources.list`, then the files
    of `sources.list.d` by name (`*.list` one-line, `*.sources` deb822)."""
    entries: list[AptEntry] = []
    main = etc_apt / "sources.list"
    if main.is_file():
        entries += parse_one_line(main.read_text(errors="replace"))
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if not path.is_file():
                continue
            if path.suffix == ".list":
                entries += parse_one_line(path.read_text(errors="replace"))
            elif path.suffix == ".sources":
                entries += parse_deb822(path.read_text(errors="replace"))
    return entries


def machine_entries(root: Path = Path("/")) -> list[AptEntry]:
    """Every entry of the apt configuration under ROOT (`/` is this machine)."""
    return read_entries(root / "etc" / "apt")


def deb_pairs(entries: Iterable[AptEntry]) -> list[tuple[str, str]]:
    """(uri, suite) of every enabled `deb` entry, URIs without a trailing slash, in order."""
    return [
        (uri.rstrip("/"), suite)
        for entry in entries
        if entry.is_deb
        for uri in entry.uris
        for suite in entry.suites
    ]


def src_deb822(entries: Iterable[AptEntry]) -> str:
    """`Types: deb-src` stanzas twinning every enabled deb822 `deb` stanza, other fields kept."""
    stanzas = [
        "\n".join(
            [
                "Types: deb-src",
                *(f"{name}: {value}" for name, value in e.fields if name.lower() != "types"),
            ]
        )
        for e in entries
        if e.style == "deb822" and e.is_deb
    ]
    return "\n\n".join(stanzas) + ("\n" if stanzas else "")


def src_one_line(entries: Iterable[AptEntry]) -> str:
    """`deb-src` lines twinning every one-line `deb` line, the rest of the line kept as written."""
    return "".join(
        "deb-src" + e.line[len("deb") :] + "\n"
        for e in entries
        if e.style == "one-line" and e.is_deb
    )
