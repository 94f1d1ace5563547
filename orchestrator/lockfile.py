"""The lock file: every input of a plan's builds that can differ between two machines, pinned.

`lfsorch lock` writes it; a run with it uses exactly those inputs or refuses before any
container starts (`LockMismatch`, listing each difference). It holds the build-host image by
id (and, once pushed, the `REPO@sha256:...` reference to pull it by), every source by the
digest the source set's view serves, the set, the settings that enter checkpoint keys, the
output-neutral list and SOURCE_DATE_EPOCH. Two runners that use one lock share checkpoint
keys: the image id is the same wherever the image was pulled.

A lock comes from elsewhere (a repository, another runner), so it is read as untrusted
input: a regular file of at most 1 MiB, JSON, every field typed and bounded, unknown keys
refused.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.build.inputs import MAKEFLAGS_JOBS, without_job_count
from orchestrator.config import Settings, known_neutral_inputs
from orchestrator.errors import ConfigError, ExitCode, LfsorchError
from orchestrator.sources.sets import Source
from orchestrator.spec.graph import Plan
from orchestrator.spec.models import NAME_PATTERN

LOCK_FILE = "lfsorch.lock"
LOCK_VERSION: Literal[1] = 1
MAX_LOCK_BYTES = 1 << 20

ImageId = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]
# A Docker reference: lowercase repository path components, an optional registry host with
# port, a tag or a digest. Bounded, and never a path on this machine.
ImageReference = Annotated[
    str,
    Field(
        pattern=r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]{1,5})?(/[a-z0-9]+([._-][a-z0-9]+)*)*"
        r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$",
        max_length=255,
    ),
]
PullReference = Annotated[
    str,
    Field(
        pattern=r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]{1,5})?(/[a-z0-9]+([._-][a-z0-9]+)*)+"
        r"@sha256:[0-9a-f]{64}$",
        max_length=255,
    ),
]
SourceFile = Annotated[str, Field(pattern=r"^[A-Za-z0-9_+][A-Za-z0-9._+~-]{0,254}$")]
SourceDigest = Annotated[str, Field(pattern=r"^([0-9a-f]{64}|[0-9a-f]{32})$")]
VariableName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
StageName = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LockedImage(_Strict):
    id: ImageId
    pull: PullReference | None = None


class LockedSettings(_Strict):
    """The settings that enter checkpoint keys, and which inputs are left out of them."""

    makeflags: str = Field(max_length=4096)  # without the job count when that is neutral
    environment: dict[VariableName, Annotated[str, Field(max_length=131072)]] = Field(
        max_length=256
    )
    network: bool
    run_tests: bool
    output_neutral: list[Annotated[str, Field(max_length=140)]] = Field(max_length=64)

    @field_validator("output_neutral")
    @classmethod
    def _known_inputs(cls, entries: list[str]) -> list[str]:
        return known_neutral_inputs(entries)


class Lock(_Strict):
    lfsorch_lock: Literal[1]
    stages: list[StageName] = Field(min_length=1, max_length=1000)
    images: dict[ImageReference, LockedImage] = Field(min_length=1, max_length=64)
    source_set: Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
    sources: dict[SourceFile, SourceDigest] = Field(max_length=100_000)
    source_date_epoch: int = Field(ge=0, le=253402300799)  # at most the year 9999
    settings: LockedSettings

    def text(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


class LockError(ConfigError):
    """A lock file that cannot be read or is not a valid lock."""


class LockMismatch(LfsorchError):
    """The run's inputs differ from the lock's; nothing was built."""

    exit_code = ExitCode.USER_ERROR

    def __init__(self, lock_path: Path, differences: Sequence[str]) -> None:
        self.differences = list(differences)
        lines = "\n".join(f"  {line}" for line in self.differences)
        super().__init__(
            f"the inputs differ from the lock {lock_path} ({len(self.differences)} "
            f"difference(s)); nothing was built:\n{lines}",
            hint="configure the run as the lock says, or write a new lock with `lfsorch lock` "
            "(`--no-lock` ignores a lock beside the stage file)",
        )


def lock_beside(stage_file: Path) -> Path:
    return stage_file.parent / LOCK_FILE


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, read only if it is a regular file of at most MAX_LOCK_BYTES: a FIFO
    would block, /dev/zero fill memory."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise LockError(f"{path}: cannot read the lock ({exc.strerror})") from None
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode):
        os.close(descriptor)
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise LockError(f"{path}: {kind} (a lock is a JSON file `lfsorch lock` writes)")
    with open(descriptor, "rb", closefd=True) as handle:
        data = handle.read(MAX_LOCK_BYTES + 1)
    if len(data) > MAX_LOCK_BYTES:
        raise LockError(f"{path}: larger than {MAX_LOCK_BYTES >> 20} MiB (a lock is short)")
    return data


def read_lock(path: Path) -> Lock:
    """The lock at `path`, validated field by field; every problem in one LockError."""
    data = _read_bytes(path)
    try:
        return Lock.model_validate_json(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            where = ".".join(str(part) for part in error["loc"]) or "(top)"
            problems.append(f"{where}: {error['msg']}")
        shown = problems[:20] + ([f"... {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise LockError(
            f"{path}: not a valid lock: " + "; ".join(shown),
            hint="write it again with `lfsorch lock STAGE_FILE...`",
        ) from None


def write_lock(lock: Lock, path: Path) -> None:
    """Write the lock atomically: a reader never sees half a lock. The temporary is made
    with O_EXCL under a random name: a link planted in a shared directory is not followed."""
    temporary: Path | None = None
    try:
        descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        temporary = Path(name)
        with open(descriptor, "w", closefd=True) as handle:
            os.fchmod(descriptor, 0o644)
            handle.write(lock.text())
        os.replace(temporary, path)
    except OSError as exc:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        if exc.errno == errno.EISDIR:
            raise LockError(f"{path}: is a directory; the lock is a file") from None
        raise LockError(f"{path}: cannot write the lock ({exc.strerror})") from None


def plan_images(plan: Plan, settings: Settings) -> list[str]:
    """Every image a build of the plan starts a container from."""
    return sorted({s.file.stage.image or settings.image for s in plan.stages})


def plan_sources(plan: Plan) -> list[Source]:
    return [
        source
        for stage_plan in plan.stages
        for package in stage_plan.file.stage.packages
        for source in package.sources
    ]


def locked_settings(settings: Settings) -> LockedSettings:
    neutral = sorted(set(settings.output_neutral))
    makeflags = settings.makeflags
    if MAKEFLAGS_JOBS in neutral:
        makeflags = without_job_count(makeflags)
    return LockedSettings(
        makeflags=makeflags,
        environment=dict(sorted(settings.environment.items())),
        network=settings.network,
        run_tests=settings.run_tests,
        output_neutral=neutral,
    )


def make_lock(
    plan: Plan,
    settings: Settings,
    images: Mapping[str, LockedImage],
    source_digest: Callable[[Source], str],
) -> Lock:
    """The lock of the plan's inputs as this machine has them now."""
    sources: dict[str, str] = {}
    unknown: list[str] = []
    for source in plan_sources(plan):
        digest = source_digest(source)
        if not digest:
            unknown.append(source.file)
        sources[source.file] = digest
    if unknown:
        raise LockError(
            f"no checksum known for {', '.join(sorted(set(unknown)))}",
            hint="fetch them first (`lfsorch sources fetch STAGE_FILE`), which trusts them "
            "on first use, or declare their sha256",
        )
    try:
        return Lock(
            lfsorch_lock=LOCK_VERSION,
            stages=[s.name for s in plan.stages],
            images=dict(images),
            source_set=settings.source_set,
            sources=dict(sorted(sources.items())),
            source_date_epoch=settings.source_date_epoch,
            settings=locked_settings(settings),
        )
    except ValidationError as exc:  # a setting or a name a lock cannot hold
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        raise LockError(f"cannot lock {where}: {first['msg']}") from None


def differences(lock: Lock, current: Lock) -> list[str]:
    """What differs between the lock and the run's inputs, one line each: the stages the
    lock does not cover, each image, each source, the set, each setting."""
    found = [
        f"stage {name}: not in the lock (it locks {', '.join(lock.stages)})"
        for name in current.stages
        if name not in lock.stages
    ]
    for reference, image in current.images.items():
        locked = lock.images.get(reference)
        if locked is None:
            found.append(f"image {reference}: not in the lock")
        elif locked.id != image.id:
            found.append(f"image {reference}: locked {locked.id}, the engine has {image.id}")
    if lock.source_set != current.source_set:
        found.append(f"source set: locked {lock.source_set}, the run uses {current.source_set}")
    for file, digest in current.sources.items():
        locked_digest = lock.sources.get(file)
        if locked_digest is None:
            found.append(f"source {file}: not in the lock")
        elif locked_digest != digest:
            found.append(f"source {file}: locked {locked_digest}, the set serves {digest}")
    if lock.source_date_epoch != current.source_date_epoch:
        found.append(
            f"source_date_epoch: locked {lock.source_date_epoch}, "
            f"the run uses {current.source_date_epoch}"
        )
    found += _setting_differences(lock.settings, current.settings)
    return found


def _setting_differences(locked: LockedSettings, current: LockedSettings) -> list[str]:
    found = []
    mine, theirs = locked.model_dump(mode="json"), current.model_dump(mode="json")
    for name in ("makeflags", "network", "run_tests", "output_neutral"):
        if mine[name] != theirs[name]:
            found.append(
                f"{name}: locked {_shown(mine[name])}, the run uses {_shown(theirs[name])}"
            )
    for variable in sorted(set(locked.environment) | set(current.environment)):
        was, now = locked.environment.get(variable), current.environment.get(variable)
        if was != now:
            found.append(
                f"environment.{variable}: locked {_shown(was)}, the run uses {_shown(now)}"
            )
    return found


def _shown(value: Any) -> str:
    return "(unset)" if value is None else json.dumps(value)
