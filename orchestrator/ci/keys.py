"""The checkpoint key after each package and each stage of a plan, computed from a lock alone
(no build, no engine): the key a CI job's checkpoint image is tagged with, so a job can see
before building that its checkpoint is already in the registry.

The keys are those a run with the lock's inputs takes at `-j 1` with a checkpoint after each
package (the same inputs, the same chaining as the scheduler's), from the partition's key
before the first stage: its content's, mode and owner of its top directory included.
"""

from __future__ import annotations

from orchestrator.build.inputs import InputsOf, inputs_key
from orchestrator.ci.slices import stage_order
from orchestrator.config import Settings
from orchestrator.lockfile import Lock, LockError
from orchestrator.sources.sets import Source
from orchestrator.spec.graph import Plan


def checkpoint_keys(plan: Plan, settings: Settings, lock: Lock, base: str) -> dict[str, str]:
    """`STAGE/PACKAGE` and `STAGE` -> the key of the checkpoint after it, on a partition
    whose key before the first stage is `base`."""

    def image_id(reference: str) -> str:
        locked = lock.images.get(reference)
        if locked is None:
            raise LockError(
                f"image {reference}: not in the lock",
                hint="write the lock again with `lfsorch lock STAGE_FILE...`",
            )
        return locked.id

    def source_digest(source: Source) -> str:
        return lock.sources.get(source.file, "")

    inputs_of = InputsOf(settings, image_id, source_digest)
    keys: dict[str, str] = {}
    parent = base
    for stage_plan in plan.stages:
        stage_file = stage_plan.file
        start = parent
        for name in stage_order(stage_plan):
            package = stage_file.stage.package(name)
            start = inputs_key([inputs_of.of(stage_file, package)], start)
            keys[f"{stage_plan.name}/{name}"] = start
        everything = [inputs_of.of(stage_file, p) for p in stage_file.stage.packages]
        parent = inputs_key(everything, parent)
        keys[stage_plan.name] = parent
    return keys
