"""Checkpoints during a run: which snapshot a stage (or package) maps to, taking and restoring.

Keys chain like the stages do: a stage's key hashes its packages' inputs (`inputs.py`: the
definitions, the image, the sources' checksums, the merged environment...) and the key of the
checkpoint it was built on, so equal keys mean equal inputs all the way down from the first
partition. The partition a run starts from gets a key from its
own content, so two empty partitions share every downstream checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import docker

from orchestrator.build.inputs import InputsOf, inputs_key, inputs_record
from orchestrator.checkpoints.manifest import snapshot_key
from orchestrator.checkpoints.store import SnapshotStore
from orchestrator.checkpoints.treescan import scan_tree, verify_tree
from orchestrator.config import Settings
from orchestrator.errors import ExitCode, LfsorchError, local_file_error
from orchestrator.execution import engine
from orchestrator.monitor import events
from orchestrator.monitor.events import EventBus
from orchestrator.spec.graph import StagePlan
from orchestrator.spec.models import CheckpointPolicy, Package, Stage
from orchestrator.spec.stagefile import StageFile

INITIAL = "(initial)"
DRIFT_SHOWN = 10


class PartitionDrift(LfsorchError):
    exit_code = ExitCode.USER_ERROR


def policy_of(stage: Stage, settings: Settings) -> CheckpointPolicy:
    """A stage file's `checkpoint:` beats every configuration layer but the command line."""
    if settings.from_command_line("checkpoint"):
        return settings.checkpoint
    return stage.checkpoint or settings.checkpoint


def tree_key(tree: Path) -> str:
    """A key for a partition nobody built: from every entry's metadata and content."""
    digest = hashlib.sha256()
    for path, entry in scan_tree(tree).items():
        if entry.type == "dir":
            # A directory's mtime says when it was made, not what the partition holds.
            entry = dataclasses.replace(entry, mtime_ns=0)
        record = [path, entry.hardlink, *entry.content()]
        if entry.type == "file" and entry.hardlink is None:
            record.append(_file_digest(tree / path))
        digest.update(json.dumps(record, sort_keys=True, default=list).encode())
    return snapshot_key(INITIAL, "", {"tree": digest.hexdigest()}, None)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Checkpointer:
    store: SnapshotStore
    client: docker.DockerClient
    settings: Settings
    bus: EventBus
    run_id: str
    # What each key computed in this run was made of; recorded in the snapshot's manifest.
    inputs: dict[str, dict[str, object]] = dataclasses.field(default_factory=dict)
    # Where this run's chain of keys starts (the plan's first stage, the partition's key
    # before it); recorded too, so a restore elsewhere can rejoin the chain.
    chain: dict[str, str] = dataclasses.field(default_factory=dict)
    # The one definition of a build's inputs, shared with the scheduler's containers.
    inputs_of: InputsOf | None = None

    def __post_init__(self) -> None:
        if self.inputs_of is None:
            client = self.client
            self.inputs_of = InputsOf(self.settings, lambda ref: engine.image_digest(client, ref))

    def key(self, stage_file: StageFile, packages: Sequence[Package], parent: str) -> str:
        """The checkpoint after building `packages` of a stage on the checkpoint `parent`."""
        assert self.inputs_of is not None
        inputs = [self.inputs_of.of(stage_file, package) for package in packages]
        key = inputs_key(inputs, parent)
        self.inputs[key] = inputs_record(inputs)
        return key

    def stage_key(self, stage_plan: StagePlan, parent: str) -> str:
        return self.key(stage_plan.file, stage_plan.file.stage.packages, parent)

    def take(
        self,
        lfs: Path,
        key: str,
        *,
        stage: str,
        parent: str | None,
        package: str | None = None,
        delta_base: str | None = None,
    ) -> bool:
        """Snapshot the partition under `key`; False when a snapshot of equal inputs already
        existed (kept: other snapshots' deltas build on it), so the partition may differ.

        The snapshot is a delta over `delta_base` (default: `parent`), the checkpoint the
        partition is closest to."""
        if self.store.has(key):
            return False
        started = time.monotonic()
        metadata = {
            "run_id": self.run_id,
            "package": package,
            **self.inputs.get(key, {}),
            **({"chain": self.chain} if self.chain else {}),
        }
        try:
            info = self.store.create(
                lfs, key, stage=stage, parent=parent, metadata=metadata, delta_base=delta_base
            )
        except OSError as exc:  # a full or read-only workspace disk, mostly
            raise local_file_error(exc, "the snapshot store", self.store.root) from None
        self.bus.emit(
            events.SnapshotCreate(
                run_id=self.run_id,
                stage=stage,
                package=package,
                key=key,
                delta=info.delta_of is not None,
                archive_bytes=info.archive_size,
                duration_s=round(time.monotonic() - started, 3),
            )
        )
        return True

    def initial(self, lfs: Path) -> tuple[str, bool]:
        """Checkpoint the partition as the run found it; its key comes from its content.

        Returns the key and whether the checkpoint was taken from this very tree (an older
        one with equal content may differ in directory mtimes, so it is restored, not assumed).
        """
        key = tree_key(lfs)
        return key, self.take(lfs, key, stage=INITIAL, parent=None)

    def restore(self, key: str, lfs: Path, *, stage: str, reason: str) -> None:
        started = time.monotonic()
        self.store.restore(key, lfs, self.client)
        self.bus.emit(
            events.SnapshotRestore(
                run_id=self.run_id,
                stage=stage,
                key=key,
                reason=reason,
                duration_s=round(time.monotonic() - started, 3),
            )
        )

    def check_drift(self, key: str, lfs: Path) -> None:
        """Refuse to build on a partition that no longer equals the checkpoint it was left at."""
        differences = verify_tree(self.store.manifest(key), lfs, content=False)
        if not differences:
            return
        shown = "\n  ".join(differences[:DRIFT_SHOWN])
        more = len(differences) - DRIFT_SHOWN
        raise PartitionDrift(
            f"the partition {lfs} changed since checkpoint {key[:12]} was taken:\n  {shown}"
            + (f"\n  ... and {more} more" if more > 0 else ""),
            hint=f"restore it with `lfsorch restore {key[:12]} --lfs {lfs}`, "
            "or rebuild a stage with `--from STAGE`",
        )
