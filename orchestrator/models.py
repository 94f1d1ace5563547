"""The stage file format: pydantic models, and the units (durations, sizes) they accept."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

from orchestrator.sourcesets import Source

NAME_PATTERN = r"^[a-z0-9][a-z0-9._+-]*$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)$")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_duration(value: Any) -> float:
    """Seconds from `90`, `90s`, `10m`, `1h30m`, `2d`."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90s, 10m or 1h30m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", text):
            text += "s"
        parts = _DURATION_PART.findall(text)
        if not text or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"{value!r} is not a duration (use e.g. 90s, 10m, 1h30m)")
        seconds = sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
    else:
        raise ValueError("expected a duration such as 90s, 10m or 1h30m")
    if seconds <= 0:
        raise ValueError("a duration must be greater than zero")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from `4096`, `512m`, `4g`, `4GiB`, `1.5G`."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512m or 4g")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE.match(value.strip().lower())
        if not match:
            raise ValueError(f"{value!r} is not a size (use e.g. 512m, 4g)")
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    else:
        raise ValueError("expected a size such as 512m or 4g")
    if size <= 0:
        raise ValueError("a size must be greater than zero")
    return size


Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(float)]
Size = Annotated[int, BeforeValidator(parse_size)]
Environment = dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], str]
CheckpointPolicy = Literal["stage", "package", "none"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(StrictModel):
    """Container limits. Memory is the hard limit: the kernel kills past it (OOM)."""

    cpus: float | None = Field(default=None, gt=0, le=1024)
    memory: Size | None = None
    pids: int | None = Field(default=None, gt=0)


class Package(StrictModel):
    name: Name
    version: str | None = None
    description: str | None = None
    depends: list[Name] = Field(default_factory=list)
    sources: list[Source] = Field(default_factory=list)
    environment: Environment = Field(default_factory=dict)
    timeout: Duration | None = None
    retries: int | None = Field(default=None, ge=0, le=100)
    network: bool | None = None
    # Passed to the container as one argument: Linux caps a single argument at 128 KiB.
    script: str = Field(min_length=1, max_length=100_000)


class Stage(StrictModel):
    stage: Name
    description: str | None = None
    requires: list[Name] = Field(default_factory=list)
    image: str | None = None
    user: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    workdir: str | None = Field(default=None, pattern=r"^/")
    environment: Environment = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    timeout: Duration | None = None
    retries: int = Field(default=0, ge=0, le=100)
    network: bool = False
    capabilities: list[Literal["fowner", "fsetid", "kill", "mknod", "sys_chroot"]] = Field(
        default_factory=list, description="capabilities beyond the base set (see the README)"
    )
    checkpoint: CheckpointPolicy | None = None  # None: the configuration's `checkpoint`
    packages: list[Package] = Field(min_length=1)

    def package(self, name: str) -> Package:
        for package in self.packages:
            if package.name == name:
                return package
        raise KeyError(name)

    def timeout_for(self, package: Package, default: float) -> float:
        return package.timeout or self.timeout or default

    def retries_for(self, package: Package) -> int:
        return self.retries if package.retries is None else package.retries

    def network_for(self, package: Package) -> bool:
        return self.network if package.network is None else package.network


def stage_json_schema() -> dict[str, Any]:
    schema = Stage.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "lfsorch stage file"
    return schema
