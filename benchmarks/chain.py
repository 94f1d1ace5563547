"""When a checkpoint is a delta and when it is full: the store's chain policy against a fixed
depth of 8 (the policy before it), side by side in one run.

    python benchmarks/chain.py [--dir /var/tmp/lfsorch-bench] [--size-mb 512] [--steps 90]
    python benchmarks/chain.py --replay WORKSPACE

The first form builds (or reuses) the generated tree of `snapshot.py`, then plays a build
shaped like chapters 7-8 on it: most steps install a package (new files, a few MiB), one
changes the owner of every file (section 7.2's chown), one adds a large compiler, the last
rewrites a third of the bytes (stripping). After each step both stores snapshot the same
tree, alternating which goes first (90 steps by default: chapter 7 takes 12 checkpoints,
chapter 8 78). Reported for each side: the store's size (archives and manifests), how many
snapshots are full, the seconds spent snapshotting, and the time and archive bytes of
restoring the last snapshot. Targets: the store at most half the size, snapshotting no
slower, and the restore reading at most 1.5 times its full base's archive. The restore's
time ratio is printed without a target: each layer adds a manifest to parse and a tar to
start, and the policy bounds the layers.

The second form replays the checkpoints a real build left in WORKSPACE (its `snapshots/`,
in order of creation) under both policies, with no tree: a delta's size is what the store
holds; a snapshot the build stored full gets, as a delta, the bytes of its changed files
at the compression its full archive had. It prints the store size each policy gives and
the most a restore of any one snapshot reads. Needs root (owners, device nodes).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from snapshot import _content, _pool, build_tree, modify_fraction

from orchestrator.checkpoints.chain import DEFAULT_POLICY, ChainPolicy
from orchestrator.checkpoints.manifest import changed_paths
from orchestrator.checkpoints.store import SnapshotStore

FIXED_DEPTH = ChainPolicy(max_layers=8, max_delta_share=math.inf)
GIB = 1 << 30


def _store_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


def _install(tree: Path, step: int, nbytes: int, pool: bytes) -> None:
    """A package's files: a directory of its own under usr/share, a binary in usr/bin."""
    directory = tree / "usr/share" / f"package{step}"
    directory.mkdir(parents=True, exist_ok=True)
    written, index = 0, 0
    while written < nbytes:
        size = min(64 << 10, nbytes - written)
        (directory / f"file{index}").write_bytes(_content(pool, step * 10_000 + index, size))
        written, index = written + size, index + 1
    (tree / "usr/bin" / f"tool{step}").write_bytes(_content(pool, step, 4096))


def _chown_all(tree: Path, uid: int) -> None:
    for path in [tree, *tree.rglob("*")]:
        os.lchown(path, uid, uid)


@dataclass
class Side:
    name: str
    store: SnapshotStore
    seconds: float = 0.0
    last: str | None = None

    def snapshot(self, tree: Path, key: str) -> None:
        start = time.perf_counter()
        self.store.create(tree, key, stage="bench", parent=self.last)
        self.seconds += time.perf_counter() - start
        self.last = key

    def fulls(self) -> int:
        return sum(1 for info in self.store.list() if info.delta_of is None)

    def restore_read(self) -> int:
        assert self.last is not None
        return sum(m.archive_size for m in self.store.chain(self.last))


def play(tree: Path, sides: list[Side], steps: int) -> None:
    pool = _pool()
    size = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file() and not p.is_symlink())
    for step in range(steps):
        if step == 2:
            _chown_all(tree, 101)
        elif step == steps // 2:
            _install(tree, step, size // 8, pool)  # the compiler
        elif step == steps - 1:
            modify_fraction(tree, 0.33, step)  # stripping
        else:
            _install(tree, step, size // 200, pool)
        for side in sides if step % 2 else reversed(sides):
            side.snapshot(tree, f"step{step:03d}")


def synthetic(args: argparse.Namespace) -> int:
    base = args.dir / "chain"
    tree = base / "tree"
    build_tree(args.dir / "tree", args.size_mb)
    shutil.rmtree(base, ignore_errors=True)
    shutil.copytree(args.dir / "tree", tree, symlinks=True)
    sides = [
        Side("fixed depth 8", SnapshotStore(base / "fixed", policy=FIXED_DEPTH)),
        Side("chain policy", SnapshotStore(base / "policy", policy=DEFAULT_POLICY)),
    ]
    play(tree, sides, args.steps)
    print(f"{args.steps} steps on a {args.size_mb} MiB tree")
    restored: dict[str, float] = {}
    for side in sides:
        target = base / f"restored-{side.name.split()[0]}"
        start = time.perf_counter()
        assert side.last is not None
        side.store.restore(side.last, target)
        restored[side.name] = time.perf_counter() - start
        shutil.rmtree(target)
        print(
            f"  {side.name:14s} store {_store_bytes(side.store.root) / GIB:6.2f} GiB, "
            f"{side.fulls():2d} full, snapshots {side.seconds:6.1f} s, restore of the last "
            f"{restored[side.name]:5.1f} s reading {side.restore_read() / GIB:5.2f} GiB"
        )
    fixed, ours = sides
    assert ours.last is not None
    size_ratio = _store_bytes(ours.store.root) / _store_bytes(fixed.store.root)
    time_ratio = ours.seconds / fixed.seconds
    read_share = ours.restore_read() / ours.store.chain(ours.last)[0].archive_size
    verdicts = [
        ("store size ratio", size_ratio, size_ratio <= 0.5, "<= 0.5"),
        ("snapshot time ratio", time_ratio, time_ratio <= 1.0, "<= 1.0"),
        ("restore read / its full base", read_share, read_share <= 1.5, "<= 1.5"),
    ]
    for label, value, ok, target in verdicts:
        print(f"  {label}: {value:.2f} (target {target}) {'ok' if ok else 'MISSED'}")
    # No target: each layer costs a manifest parse and a tar start, the price of the bytes
    # saved, and the layers are bounded by the policy.
    print(
        f"  restore time ratio: {restored[ours.name] / restored[fixed.name]:.2f} "
        f"({len(ours.store.chain(ours.last))} layers against "
        f"{len(fixed.store.chain(fixed.last or ''))})"
    )
    shutil.rmtree(base)
    return 0 if all(ok for _, _, ok, _ in verdicts) else 1


def replay(workspace: Path) -> int:
    store = SnapshotStore(workspace / "snapshots")
    manifests = sorted((store.manifest(info.key) for info in store.list()), key=lambda m: m.created)
    by_key = {m.key: m for m in manifests}
    steps = []  # (archive bytes as a delta, tar bytes as a delta, archive bytes if full)
    ratio = 0.35
    for manifest in manifests:
        tree_raw = sum(e.size + 512 for e in manifest.entries.values())
        if manifest.delta_of is None and manifest.raw_size:
            ratio = manifest.archive_size / manifest.raw_size
        if manifest.delta_of is not None:
            as_delta, raw = manifest.archive_size, manifest.raw_size
        elif manifest.parent in by_key:
            changed = changed_paths(by_key[manifest.parent], manifest.entries)
            raw = sum(manifest.entries[path].size + 512 for path in changed)
            as_delta = int(raw * ratio)
        else:
            as_delta, raw = manifest.archive_size, tree_raw
        full = manifest.archive_size if manifest.delta_of is None else int(tree_raw * ratio)
        steps.append((as_delta, raw, full, tree_raw))
    print(f"{len(steps)} checkpoints in {workspace}")
    for name, policy in (("fixed depth 8", FIXED_DEPTH), ("chain policy", DEFAULT_POLICY)):
        total = fulls = worst = 0
        chain: list[int] = []
        budget = 0.0
        for as_delta, raw, full, tree_raw in steps:
            if not chain or len(chain) >= policy.max_layers or (raw > 1024 and raw > budget):
                chain, fulls = [full], fulls + 1
                budget = policy.max_delta_share * tree_raw
            else:
                chain.append(as_delta)
                budget -= raw
            total += chain[-1]
            worst = max(worst, sum(chain))
        print(
            f"  {name:14s} archives {total / GIB:6.2f} GiB, {fulls:3d} full, "
            f"a restore reads at most {worst / GIB:4.2f} GiB"
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/lfsorch-bench"))
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--replay", type=Path, metavar="WORKSPACE")
    args = parser.parse_args()
    return replay(args.replay) if args.replay else synthetic(args)


if __name__ == "__main__":
    raise SystemExit(main())
