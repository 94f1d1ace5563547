"""What a package's build depends on: the one definition behind the container's environment,
the record's skip-done digest and every checkpoint key.

Everything that reaches a container and can change what it produces is an input: the stage
and package definition, the image (by id), the sources' checksums, the environment merged
from every configuration layer, the user, the workdir, the network setting and the limits.
Inputs the configuration declares output-neutral (`output_neutral`: at least the job count
in MAKEFLAGS and the attempt number) reach the container but stay out of keys, so runners of
different sizes share checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.config import Settings
from orchestrator.sources.sets import Source
from orchestrator.spec.environment import CHROOT_PATH, expand_environment
from orchestrator.spec.models import Package, Resources, Stage
from orchestrator.spec.stagefile import StageFile, asset_digest

KEY_VERSION = 2
MAKEFLAGS_JOBS = "makeflags.jobs"
_JOBS_TOKEN = re.compile(r"^(-j\d*|--jobs(=\d*)?)$")
_JOBS_FLAG = re.compile(r"^(-j|--jobs)$")


def without_job_count(makeflags: str) -> str:
    """MAKEFLAGS minus `-jN`, `-j N`, `--jobs=N` and `--jobs N`: the rest can change output.

    Words are split at whitespace as make splits them (make knows no shell quotes), and the
    rest keeps its bytes: `V="1 2"` and `V=1 2` are different flags and stay different."""
    parts = re.split(r"(\s+)", makeflags)
    words, separators = parts[0::2], ["", *parts[1::2]]
    kept = ""
    previous = ""
    for word, separator in zip(words, separators, strict=True):
        count_of_bare_flag = bool(_JOBS_FLAG.match(previous)) and word.isdigit()
        previous = word
        if _JOBS_TOKEN.match(word) or count_of_bare_flag or not word:
            continue
        kept += (separator if kept else "") + word
    return kept


def merged_environment(
    stage: Stage, package: Package, settings: Settings, attempt: int
) -> dict[str, str]:
    """The variables a build's container gets, lowest layer first: the configuration's
    `environment`, MAKEFLAGS, SOURCE_DATE_EPOCH, LFSORCH_ATTEMPT and LFSORCH_RUN_TESTS (and the
    book's PATH for a chroot package), then
    the stage's and the package's variables, then what the command line set, which wins over
    a stage file."""
    command_line = settings.command_line_environment
    base = {n: v for n, v in settings.environment.items() if n not in command_line}
    base["MAKEFLAGS"] = settings.makeflags
    base["SOURCE_DATE_EPOCH"] = str(settings.source_date_epoch)
    base["LFSORCH_ATTEMPT"] = str(attempt)  # scripts may build differently on a retry
    if settings.run_tests:
        base["LFSORCH_RUN_TESTS"] = "1"
    if stage.chroot_for(package):
        base.setdefault("PATH", CHROOT_PATH)
    last = dict(command_line)
    if settings.from_command_line("makeflags"):
        last["MAKEFLAGS"] = settings.makeflags
    if settings.from_command_line("run_tests") and settings.run_tests:
        last["LFSORCH_RUN_TESTS"] = "1"
    merged = expand_environment([base, stage.environment, package.environment, last])
    if settings.from_command_line("run_tests") and not settings.run_tests:
        merged.pop("LFSORCH_RUN_TESTS", None)
    return merged


@dataclass(frozen=True)
class PackageInputs:
    """One package's build as its container sees it."""

    stage: str
    package: Package
    assets: str  # digest of the stage's declared assets, mounted at /stage
    image: str  # the reference the container is created from
    image_id: str
    environment: dict[str, str]
    user: str | None
    workdir: str | None
    network: bool
    resources: Resources
    capabilities: tuple[str, ...] = ()  # beyond the base set: mknod can add device nodes
    neutral: Sequence[str] = field(default_factory=tuple)
    # The digest of each source as /sources holds it; a source set may map a file name to
    # other bytes than the stage declares (Debian's repacked tarballs).
    source_digests: dict[str, str] | None = None
    chroot: bool = False  # the container's root is the partition: an input only when set

    def all_inputs(self) -> dict[str, Any]:
        package = self.package.model_dump(
            mode="json",
            include={"name", "version", "depends", "script"},
        )
        inputs = {
            "stage": self.stage,
            **package,
            "assets": self.assets,
            "image": self.image_id,
            "sources": self.source_digests
            if self.source_digests is not None
            else {s.file: _declared_digest(s) for s in self.package.sources},
            # The first source is the one unpacked and entered: order changes the build.
            "source_order": [s.file for s in self.package.sources],
            "environment": dict(sorted(self.environment.items())),
            "user": self.user,
            "workdir": self.workdir,
            "network": self.network,
            "resources": self.resources.model_dump(mode="json"),
            "capabilities": sorted(self.capabilities),
        }
        if self.chroot:  # absent otherwise, so the keys of other stages stay as they were
            inputs["chroot"] = True
        return inputs

    def split(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(what is hashed, what was left out as output-neutral, by configuration entry)."""
        hashed = self.all_inputs()
        left_out: dict[str, Any] = {}
        for entry in self.neutral:
            if entry == MAKEFLAGS_JOBS:
                makeflags = hashed["environment"].get("MAKEFLAGS")
                if makeflags is not None:
                    hashed["environment"]["MAKEFLAGS"] = without_job_count(makeflags)
                    left_out[entry] = makeflags
                continue
            head, _, name = entry.partition(".")
            holder = hashed if not name else hashed.get(head)
            if isinstance(holder, dict) and (name or head) in holder:
                value = holder.pop(name or head)
                if isinstance(value, dict):  # a whole group: shown entry by entry
                    left_out.update({f"{entry}.{inner}": v for inner, v in value.items()})
                else:
                    left_out[entry] = value
        return hashed, left_out

    def hashed(self) -> dict[str, Any]:
        return self.split()[0]


def _declared_digest(source: Source) -> str:
    return source.sha256 or source.md5 or ""


def inputs_key(inputs: Sequence[PackageInputs], parent: str | None) -> str:
    """The key of building these packages (in this order) on the checkpoint `parent`."""
    payload = {"v": KEY_VERSION, "packages": [i.hashed() for i in inputs], "parent": parent}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def inputs_record(inputs: Sequence[PackageInputs]) -> dict[str, Any]:
    """What a checkpoint's manifest records about its key: every input hashed, every
    output-neutral one left out (with the value this build had)."""
    hashed = [i.split()[0] for i in inputs]
    neutral = {i.package.name: i.split()[1] for i in inputs}
    images = sorted({h["image"] for h in hashed})
    return {
        "image": images[0] if len(images) == 1 else images,
        "sources": {file: sum_ for h in hashed for file, sum_ in h["sources"].items()},
        "definition": {"stage": inputs[0].stage if inputs else "", "packages": hashed},
        "inputs": sorted({name for h in hashed for name in _names(h)}),
        "neutral": {name: value for left in neutral.values() for name, value in left.items()},
    }


def _names(hashed: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for key, value in hashed.items():
        if key in ("environment", "resources") and isinstance(value, dict):
            names.extend(f"{key}.{inner}" for inner in value)
        else:
            names.append(key)
    return names


@dataclass
class InputsOf:
    """Computes packages' inputs for one run; each image is looked up once, so every key of
    the run sees the same image id."""

    settings: Settings
    image_id_of: Callable[[str], str]
    # What each source hashes to in the view the builds mount; None: as the stage declares.
    source_digest: Callable[[Source], str] | None = None
    _image_ids: dict[str, str] = field(default_factory=dict)

    def image_id(self, reference: str) -> str:
        if reference not in self._image_ids:
            self._image_ids[reference] = self.image_id_of(reference)
        return self._image_ids[reference]

    def of(self, stage_file: StageFile, package: Package, attempt: int = 1) -> PackageInputs:
        stage = stage_file.stage
        image = stage.image or self.settings.image
        return PackageInputs(
            stage=stage.stage,
            package=package,
            assets=asset_digest(stage_file),
            image=image,
            image_id=self.image_id(image),
            environment=merged_environment(stage, package, self.settings, attempt),
            user=stage.user,
            workdir=stage.workdir,
            network=stage.network_for(package) or self.settings.network,
            resources=stage.resources,
            capabilities=stage.capabilities_for(package),
            neutral=tuple(self.settings.output_neutral),
            source_digests={
                s.file: (self.source_digest or _declared_digest)(s) for s in package.sources
            },
            chroot=stage.chroot_for(package),
        )

    def key(self, stage_file: StageFile, packages: Sequence[Package], parent: str | None) -> str:
        return inputs_key([self.of(stage_file, p) for p in packages], parent)

    def digest(self, stage_file: StageFile, package: Package) -> str:
        """The record's digest of a package: a change means it must be built again."""
        return self.key(stage_file, [package], None)[:16]
