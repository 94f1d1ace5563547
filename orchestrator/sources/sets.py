"""What the stages declare (`Source`) and the named source sets that route those files.

A set is `upstream` (the URLs of the stage files) or Debian-derived: then it maps file names
to orig tarballs of Debian source packages, with the digest the build must see. Set files are
YAML under `stages/sourcesets/`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestrator.sources.errors import SourceSetError

UPSTREAM = "upstream"
_HEX64 = r"^[0-9a-f]{64}$"
_FILE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._+~-]*$"


class Source(BaseModel):
    """One file a package needs. `file` is its name in the cache and in /sources."""

    model_config = ConfigDict(extra="forbid")

    file: str = Field(pattern=_FILE_NAME)
    url: str | None = None
    mirrors: list[str] = Field(default_factory=list)
    sha256: str | None = Field(default=None, pattern=_HEX64)
    md5: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")

    def urls(self) -> list[str]:
        return [u for u in [self.url, *self.mirrors] if u]


class DebianOrig(BaseModel):
    """Where a source set takes one file from: a Debian source package's orig tarball."""

    model_config = ConfigDict(extra="forbid")

    package: str
    # Pins a Debian version when the archive has moved on (linux gets point releases).
    version: str | None = None
    orig: str = Field(pattern=_FILE_NAME)
    orig_sha256: str | None = Field(default=None, pattern=_HEX64)
    # The orig wraps the real tarball (gcc-12's orig holds gcc-12.2.0-dfsg.tar.xz).
    member: str | None = None
    sha256: str = Field(pattern=_HEX64, description="digest of the file the build uses")
    # Other places that serve the same orig (a mirror may lack files the index lists): tried
    # after every place apt knows of, and only a copy with `orig_sha256` is taken.
    mirrors: list[str] = Field(default_factory=list, max_length=16)
    note: str | None = None

    @model_validator(mode="after")
    def _mirrors_need_a_digest(self) -> DebianOrig:
        if self.mirrors and self.orig_sha256 is None:
            raise ValueError("mirrors need orig_sha256: a copy from elsewhere must be checked")
        return self


class SourceSet(BaseModel):
    """A named route to the files: `upstream` (the stage's URLs) or a Debian-derived set."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    description: str = ""
    kind: Literal["upstream", "debian"] = "upstream"
    files: dict[str, DebianOrig] = Field(default_factory=dict)

    def expected_sha256(self, source: Source) -> str | None:
        entry = self.files.get(source.file)
        return entry.sha256 if entry else source.sha256


UPSTREAM_SET = SourceSet(name=UPSTREAM, description="the URLs declared in the stage files")


def default_set_dirs() -> list[Path]:
    """Where set files are looked up when the caller names none: the repo's stages/sourcesets."""
    return [Path(__file__).resolve().parents[2] / "stages" / "sourcesets"]


def load_source_set(name: str, search_dirs: Sequence[Path] | None = None) -> SourceSet:
    """The set called `name`, read from `<dir>/<name>.yaml` in the first dir that has it."""
    if name == UPSTREAM:
        return UPSTREAM_SET
    dirs = list(search_dirs) if search_dirs else default_set_dirs()
    for directory in dirs:
        path = directory / f"{name}.yaml"
        if path.is_file():
            return load_source_set_file(path)
    looked = ", ".join(str(d) for d in dirs)
    raise SourceSetError(
        f"unknown source set {name!r}: no {name}.yaml in {looked}",
        hint=f"use `{UPSTREAM}` or a set file name from one of those directories",
    )


def load_source_set_file(path: Path) -> SourceSet:
    try:
        data = yaml.safe_load(path.read_text())
        return SourceSet.model_validate(data)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise SourceSetError(f"cannot read source set {path}: {exc}") from exc
