"""Layered configuration: each value remembers which layer set it.

Layers, lowest first: built-in defaults, the system file, the profile, the user file,
LFSORCH_* environment variables, and `-o key=value` on the command line.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import platformdirs
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from orchestrator.errors import ConfigError
from orchestrator.spec.models import CheckpointPolicy, Duration, Environment, Recovery, Size

SYSTEM_FILE = Path("/etc/lfsorch/config.yaml")
ENV_PREFIX = "LFSORCH_"
Profile = Literal["minimal", "standard", "full"]
COMMAND_LINE = "command line"
# Build inputs that never change what a build produces, so they stay out of checkpoint keys:
# the job count in MAKEFLAGS (as the number of cores in Nix), the attempt number, the CPU
# limit. `environment.NAME` leaves out one variable; configuration layers add to this list.
# Limits only decide whether a build finishes, never what it installs (a retry after an OOM kill
# may raise the memory limit and still meet the same checkpoint).
NEUTRAL_DEFAULT = ["makeflags.jobs", "environment.LFSORCH_ATTEMPT", "resources"]
NEUTRAL_CHOICES = "makeflags.jobs, environment.NAME, network, resources, resources.cpus|memory|pids"
_NEUTRAL = re.compile(
    r"makeflags\.jobs|environment\.[A-Za-z_][A-Za-z0-9_]*|network|resources"
    r"|resources\.(cpus|memory|pids)"
)


# LFS 11.3's release day (2023-03-01 00:00 UTC): a fixed date, so tools that embed a build
# date (gzip headers, Python's .pyc, man pages) give the same bytes on every build.
LFS_RELEASE_EPOCH = 1677628800


def known_neutral_inputs(entries: list[str]) -> list[str]:
    """The entries of an `output_neutral` list, each checked to name an input that can be."""
    for entry in entries:
        if not _NEUTRAL.fullmatch(entry):
            raise ValueError(f"{entry!r} is not an input that can be neutral ({NEUTRAL_CHOICES})")
    return entries


def _default_makeflags() -> str:
    return f"-j{os.cpu_count() or 1}"


class Settings(BaseModel):
    """Every configuration key, with its meaning."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: Profile = Field("standard", description="minimal, standard or full")
    image: str = Field("lfsorch/host:bookworm", description="image of stages that name none")
    parallel_builds: int = Field(1, ge=1, le=64, description="packages built side by side")
    makeflags: str = Field(
        default_factory=_default_makeflags, description="MAKEFLAGS inside every build"
    )
    timeout: Duration = Field(7200.0, description="package timeout when the stage sets none")
    environment: Environment = Field(
        default_factory=dict, description="variables added to every build's clean environment"
    )
    network: bool = Field(False, description="allow network in build containers")
    build_space: Size = Field(
        16 << 30, description="disk a build may fill outside its mounts (/build, /tmp)"
    )
    checkpoint: CheckpointPolicy = Field("stage", description="when to snapshot the partition")
    run_tests: bool = Field(False, description="LFSORCH_RUN_TESTS=1 in builds (book's tests)")
    source_date_epoch: int = Field(
        LFS_RELEASE_EPOCH,
        ge=0,
        description="SOURCE_DATE_EPOCH in every build: the date tools embed instead of now",
    )
    source_set: str = Field("upstream", description="where sources come from (upstream, debian12)")
    plugins: list[str] = Field(
        default_factory=list, description="plugin modules whose hooks see every run"
    )
    monitor_interval: Duration = Field(
        10.0, ge=0.5, description="how often the host's load, memory and free space are sampled"
    )
    min_free_memory: Size = Field(
        256 << 20, description="available memory below which memory is reported depleted"
    )
    log_tail_lines: int = Field(20, ge=0, description="log lines shown for a failed package")
    log_max_bytes: int = Field(10 << 20, ge=1024, description="JSON event log size before rotation")
    log_backups: int = Field(5, ge=0, description="rotated, compressed event logs kept")
    recovery: Recovery = Field(
        default_factory=lambda: Recovery(),
        description="how failed attempts are handled by failure class (see the README)",
    )
    output_neutral: list[str] = Field(
        default_factory=lambda: list(NEUTRAL_DEFAULT),
        description=f"build inputs left out of checkpoint keys ({NEUTRAL_CHOICES}); "
        "each layer adds to the list",
    )

    # The command-line layer, which beats a stage file's own values (they sit just below it).
    _command_line: frozenset[str] = PrivateAttr(default_factory=frozenset)
    _command_line_environment: frozenset[str] = PrivateAttr(default_factory=frozenset)

    @field_validator("output_neutral")
    @classmethod
    def _known_inputs(cls, entries: list[str]) -> list[str]:
        return known_neutral_inputs(entries)

    def from_command_line(self, key: str) -> bool:
        return key in self._command_line

    @property
    def command_line_environment(self) -> dict[str, str]:
        """The variables `-o environment.NAME=...` set."""
        return {n: v for n, v in self.environment.items() if n in self._command_line_environment}


PROFILES: dict[str, dict[str, Any]] = {
    "minimal": {"checkpoint": "none", "run_tests": False},
    "standard": {"checkpoint": "stage", "run_tests": False},
    "full": {"checkpoint": "package", "run_tests": True},
}


@dataclass(frozen=True)
class Config:
    settings: Settings
    origins: dict[str, str] = field(default_factory=dict)

    def show(self) -> list[tuple[str, Any, str]]:
        """(key, value, where it came from) for every key."""
        data = self.settings.model_dump(mode="json")
        return [(key, data[key], self.origins.get(key, "default")) for key in data]


def user_file() -> Path:
    return Path(platformdirs.user_config_dir("lfsorch")) / "config.yaml"


MAX_CONFIG_BYTES = 1 << 20


def _read_text(path: Path) -> str:
    """The file's text, read only if it is a regular file of at most 1 MiB: a FIFO would
    block every command, and /dev/zero would fill memory."""
    # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just after.
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(descriptor, "rb", closefd=True) as handle:
        info = os.fstat(handle.fileno())
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(
                f"{path}: not a regular file (a configuration file is UTF-8 YAML)",
                hint="point LFSORCH_CONFIG at the YAML file, or remove it",
            )
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB (a configuration file is short)",
            hint="point LFSORCH_CONFIG at the YAML file, or remove it",
        )
    return data.decode("utf-8")


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(_read_text(path))
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError:
        raise ConfigError(
            f"{path}: not a text file (a configuration file is UTF-8 YAML)",
            hint="point LFSORCH_CONFIG at the YAML file, or remove it",
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read the configuration file ({exc.strerror})",
            hint="point LFSORCH_CONFIG at a YAML file, or remove what is there",
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of configuration keys")
    return data


def _parse_scalar(text: str) -> Any:
    """`-o key=value` values are YAML scalars, so `4`, `true` and `{A: b}` mean what they say."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    keys = Settings.model_fields
    layer: dict[str, Any] = {}
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX):
            key = name[len(ENV_PREFIX) :].lower()
            if key in keys:
                layer[key] = _parse_scalar(value)
    return layer


def _from_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"-o {item!r}: expected KEY=VALUE", hint="for example -o parallel_builds=2"
            )
        key = key.strip()
        if key.startswith("environment."):
            layer.setdefault("environment", {})[key.split(".", 1)[1]] = value
        elif key.startswith("recovery."):
            layer.setdefault("recovery", {})[key.split(".", 1)[1]] = _parse_scalar(value)
        else:
            layer[key] = _parse_scalar(value)
    return layer


def _check_keys(layer: Mapping[str, Any], origin: str) -> None:
    unknown = sorted(set(layer) - set(Settings.model_fields))
    if unknown:
        known = ", ".join(Settings.model_fields)
        raise ConfigError(f"{origin}: unknown key(s) {', '.join(unknown)}", hint=f"known: {known}")


def load_config(
    overrides: Sequence[str] = (),
    *,
    system_file: Path = SYSTEM_FILE,
    user_config: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    environ = os.environ if environ is None else environ
    if user_config is None:
        explicit = environ.get("LFSORCH_CONFIG")
        user_config = Path(explicit) if explicit else user_file()
    named_layers = [
        (f"system file {system_file}", _read_file(system_file)),
        (f"user file {user_config}", _read_file(user_config)),
        ("environment", _from_environment(environ)),
        (COMMAND_LINE, _from_overrides(overrides)),
    ]
    for origin, layer in named_layers:
        _check_keys(layer, origin)

    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    profile = "standard"
    for origin, layer in named_layers:
        if "profile" in layer:
            profile, origins["profile"] = layer["profile"], origin
    if profile not in PROFILES:
        raise ConfigError(
            f"{origins.get('profile', 'default')}: unknown profile {profile!r}",
            hint=f"choose one of {', '.join(PROFILES)}",
        )
    # The profile sits between the system file and the user file.
    ordered = [named_layers[0], (f"profile {profile}", PROFILES[profile]), *named_layers[1:]]
    for origin, layer in ordered:
        for key, value in layer.items():
            if key in ("environment", "recovery") and isinstance(value, dict):
                merged.setdefault(key, {}).update(value)  # entry by entry, layer over layer
            elif key == "output_neutral" and isinstance(value, list):
                known = merged.setdefault("output_neutral", list(NEUTRAL_DEFAULT))
                known.extend(item for item in value if item not in known)
            else:
                merged[key] = value
            origins[key] = origin
    merged["profile"] = profile
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        messages = [
            f"{'.'.join(map(str, e['loc']))} (from {origins.get(str(e['loc'][0]), 'default')}): "
            f"{e['msg']}"
            for e in exc.errors()
        ]
        raise ConfigError("invalid configuration: " + "; ".join(messages)) from None
    command_line = named_layers[-1][1]
    settings._command_line = frozenset(command_line)
    settings._command_line_environment = frozenset(command_line.get("environment") or {})
    return Config(settings, origins)
