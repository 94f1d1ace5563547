"""The stage file format: pydantic models, and the units (durations, sizes) they accept."""

from __future__ import annotations

import math
import os
import re
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    model_validator,
)

from orchestrator.sources.sets import Source

NAME_PATTERN = r"^[a-z0-9][a-z0-9._+-]*$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)$")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# Digits beyond these can only be mistakes; refusing them early also keeps float() finite.
_MAX_NUMBER_TEXT = 32

MAX_DURATION_S = 7 * 86400
# The engine refuses less memory than this at container start.
MIN_MEMORY = 6 << 20
# Past this the engine's 64-bit fields overflow; no host has that much memory.
MAX_MEMORY = 1 << 50
MIN_CPUS = 0.01  # the engine's smallest CPU quota; below it Docker means "no limit"
MAX_PIDS = 4_194_304  # the kernel's pid_max ceiling (PID_MAX_LIMIT)
MAX_ASSETS = 1000


def _finite_number(value: int | float, what: str) -> float:
    """A finite float from a YAML number, without float()'s OverflowError on huge ints."""
    if isinstance(value, int) and abs(value) >= 10**_MAX_NUMBER_TEXT:
        raise ValueError(f"{what} of {len(str(abs(value)))} digits is far too large")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, not {value}")
    return number


def parse_duration(value: Any) -> float:
    """Seconds from `90`, `90s`, `10m`, `1h30m`, `2d`."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90s, 10m or 1h30m")
    if isinstance(value, int | float):
        seconds = _finite_number(value, "a duration")
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if len(text) > _MAX_NUMBER_TEXT:
            raise ValueError(f"a duration of {len(text)} characters is far too long")
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
    if seconds > MAX_DURATION_S:
        raise ValueError(f"a duration must be at most 7d ({MAX_DURATION_S}s), not {value}")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from `4096`, `512m`, `4g`, `4GiB`, `1.5G`."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512m or 4g")
    if isinstance(value, int):
        size = int(_finite_number(value, "a size")) if value > 0 else value
    elif isinstance(value, str):
        if len(value) > _MAX_NUMBER_TEXT:
            raise ValueError(f"a size of {len(value)} characters is far too long")
        match = _SIZE.match(value.strip().lower())
        if not match:
            raise ValueError(f"{value!r} is not a size (use e.g. 512m, 4g)")
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    else:
        raise ValueError("expected a size such as 512m or 4g")
    if size <= 0:
        raise ValueError("a size must be greater than zero")
    return size


def _memory_in_range(size: int) -> int:
    if size < MIN_MEMORY:
        raise ValueError(f"memory must be at least 6m ({MIN_MEMORY} bytes), not {size} bytes")
    if size > MAX_MEMORY:
        raise ValueError(f"memory must be at most 1024t, not {size} bytes")
    return size


def _cpus_in_range(cpus: float) -> float:
    host = os.cpu_count() or 1
    if not math.isfinite(cpus) or cpus < MIN_CPUS:
        raise ValueError(f"cpus must be at least {MIN_CPUS}, not {cpus}")
    if cpus > host:
        raise ValueError(f"cpus must be at most this host's {host} CPUs, not {cpus}")
    return cpus


def _pids_in_range(pids: int) -> int:
    if not 0 < pids <= MAX_PIDS:
        raise ValueError(f"pids must be between 1 and {MAX_PIDS}, not {pids}")
    return pids


def check_asset_path(text: str) -> str:
    """A path relative to the stage file's directory that cannot leave it; normalized."""
    if "\0" in text:
        raise ValueError("an asset path must not contain NUL")
    path = PurePosixPath(text)
    if path.is_absolute():
        raise ValueError(f"{text!r} is absolute; name assets relative to the stage file")
    if ".." in path.parts:
        raise ValueError(f"{text!r} contains '..'; assets must stay beside the stage file")
    if not path.parts or path.parts == (".",):
        raise ValueError(
            "name files or a subdirectory, not the stage file's own directory as a whole"
        )
    return path.as_posix()


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(float)]
Size = Annotated[int, BeforeValidator(parse_size)]
AssetPath = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(check_asset_path)]
Environment = dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], str]
CheckpointPolicy = Literal["stage", "package", "none"]
Capability = Literal["fowner", "fsetid", "kill", "mknod", "setfcap", "sys_chroot"]
# Who a chroot package may run as: it is root in the partition's own system.
_ROOT_USERS = (None, "root", "0")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(StrictModel):
    """Container limits. Memory is the hard limit: the kernel kills past it (OOM)."""

    cpus: Annotated[float, AfterValidator(_cpus_in_range)] | None = None
    memory: Annotated[Size, AfterValidator(_memory_in_range)] | None = None
    pids: Annotated[int, AfterValidator(_pids_in_range)] | None = None


class Recovery(StrictModel):
    """How failed attempts are handled, by failure class; the configuration's `recovery`
    holds the defaults, a stage's or package's `recovery` changes single entries."""

    backoff: Duration = Field(
        default=1.0, description="wait before a build retry; doubles each time"
    )
    backoff_max: Duration = Field(default=30.0, description="longest wait between build retries")
    memory_factor: float = Field(
        default=2.0, ge=1.0, le=64.0, description="memory limit multiplier after an OOM kill at -j1"
    )
    memory_cap: Annotated[Size, AfterValidator(_memory_in_range)] = Field(
        default=4 << 30, description="highest memory limit a retry may raise to"
    )
    timeout_factor: float | None = Field(
        default=None, gt=1.0, le=100.0, description="timeout multiplier for one retry; none: fail"
    )
    min_free_space: Size = Field(
        default=1 << 30, description="free space the partition's and workspace's filesystems keep"
    )
    space_wait: Duration = Field(
        default=60.0, description="how long to wait for free space before stopping the run"
    )
    keep_snapshots: int | None = Field(
        default=None, ge=1, description="when space runs short, prune to this many snapshots"
    )
    engine_wait: Duration = Field(
        default=300.0, description="how long to wait for an engine gone away"
    )


class Package(StrictModel):
    name: Name
    version: str | None = None
    description: str | None = None
    # The book's build time in SBUs: `lfsorch ci plan` estimates from it where no earlier run
    # did; never part of a checkpoint key.
    sbu: float | None = Field(default=None, ge=0, le=1000)
    depends: list[Name] = Field(default_factory=list)
    sources: list[Source] = Field(default_factory=list)
    environment: Environment = Field(default_factory=dict)
    timeout: Duration | None = None
    retries: int | None = Field(default=None, ge=0, le=100)
    network: bool | None = None
    recovery: Recovery | None = None  # entries set here win over the stage's and defaults
    # None: the stage's `chroot`; false in a chroot stage runs in the host image (/mnt/lfs).
    chroot: bool | None = None
    capabilities: list[Capability] = Field(
        default_factory=list, description="capabilities added to the stage's for this package"
    )
    # Passed to the container as one argument: Linux caps a single argument at 128 KiB.
    script: str = Field(min_length=1, max_length=100_000)


class Stage(StrictModel):
    stage: Name
    description: str | None = None
    requires: list[Name] = Field(default_factory=list)
    # Files or directories beside the stage file, copied read-only to /stage in every build.
    assets: Annotated[list[AssetPath], BeforeValidator(_one_or_many)] = Field(
        default_factory=list, max_length=MAX_ASSETS
    )
    image: str | None = None
    user: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    workdir: str | None = Field(default=None, pattern=r"^/")
    environment: Environment = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    timeout: Duration | None = None
    retries: int = Field(default=0, ge=0, le=100)
    network: bool = False
    capabilities: list[Capability] = Field(
        default_factory=list, description="capabilities beyond the base set (see the README)"
    )
    # Each package in a container whose root filesystem is the partition (see the README).
    chroot: bool = False
    checkpoint: CheckpointPolicy | None = None  # None: the configuration's `checkpoint`
    recovery: Recovery | None = None  # entries set here win over the configuration's
    packages: list[Package] = Field(min_length=1)

    @model_validator(mode="after")
    def _chroot_runs_as_root(self) -> Stage:
        chrooted = [p.name for p in self.packages if self.chroot_for(p)]
        if chrooted and self.user not in _ROOT_USERS:
            raise ValueError(
                f"user {self.user!r} cannot apply to chroot packages ({', '.join(chrooted)}): "
                "they run as root in the partition's own system"
            )
        return self

    def package(self, name: str) -> Package:
        for package in self.packages:
            if package.name == name:
                return package
        raise KeyError(name)

    def timeout_for(self, package: Package, default: float) -> float:
        return package.timeout or self.timeout or default

    def retries_for(self, package: Package) -> int:
        return self.retries if package.retries is None else package.retries

    def recovery_for(self, package: Package, default: Recovery) -> Recovery:
        """The configuration's table, then the stage's entries, then the package's."""
        merged = default
        for layer in (self.recovery, package.recovery):
            if layer is not None:
                merged = merged.model_copy(update=layer.model_dump(exclude_unset=True))
        return merged

    def network_for(self, package: Package) -> bool:
        return self.network if package.network is None else package.network

    def chroot_for(self, package: Package) -> bool:
        return self.chroot if package.chroot is None else package.chroot

    def capabilities_for(self, package: Package) -> tuple[str, ...]:
        """The stage's, then those only the package adds (the stage's order is its key's)."""
        added = [name for name in package.capabilities if name not in self.capabilities]
        return (*self.capabilities, *dict.fromkeys(added))


def stage_json_schema() -> dict[str, Any]:
    schema = Stage.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "lfsorch stage file"
    return schema
