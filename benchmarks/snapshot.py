"""Snapshot/restore throughput against plain `tar | zstd` pipelines, in one run.

    python benchmarks/snapshot.py [--dir /var/tmp/lfsorch-bench] [--size-mb 1024]

Builds (or reuses) a deterministic tree shaped like an LFS partition (a few large files and
many small ones in many directories, compressible but not trivially so), then reports, each
measured --runs times (default 3), alternating the two sides, with the page cache warmed
for both; the verdict uses each side's best, the median ratio is printed beside it:
  * full snapshot vs `tar -c | zstd -T0 -3`            target ratio >= 0.9
  * restore vs `zstd -d | tar -x`, onto the disk of --dir and, where /dev/shm has room,
    into memory                                         target ratio >= 0.9
  * incremental snapshot after changing 5% vs a full    target <= 0.15
Each line also gives the CPU seconds the side used (its threads and child processes). On a
machine whose cores the pipeline already keeps busy, every CPU second lfsorch adds (the
per-file BLAKE3 digests of the manifest, validating each member before tar sees it, checking the
restored tree against the manifest) costs wall time, so the CPU ratio bounds the
throughput ratio there. Needs root (owners, device nodes); no Docker engine: the store's
own archives are extracted with the host's tar after validation, in the mount-namespace
sandbox that confines it to the staging directory.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.checkpoints.store import SnapshotStore

POOL_BYTES = 64 << 20
LARGE_FILE = 16 << 20
SMALL_DIRS = 400
SEED = 20240601


def _pool() -> bytes:
    """64 MiB of text-and-noise: zstd -3 gets roughly 2-3x, like binaries and docs."""
    rng = random.Random(SEED)
    words = [rng.randbytes(rng.randint(2, 9)).hex().encode() for _ in range(8192)]
    text = b" ".join(rng.choices(words, k=300_000))
    parts = []
    size = 0
    while size < POOL_BYTES:
        offset = rng.randrange(len(text) - 8192)
        part = rng.randbytes(1024) + text[offset : offset + 7168]
        parts.append(part)
        size += len(part)
    return b"".join(parts)[:POOL_BYTES]


def _content(pool: bytes, index: int, size: int) -> bytes:
    digest = hashlib.sha256(index.to_bytes(8, "big")).digest()
    start = int.from_bytes(digest[:8], "big") % (len(pool) - min(size, len(pool) - 1) - 1)
    if size <= len(pool) - start:
        return pool[start : start + size]
    return (pool[start:] + pool * (size // len(pool) + 1))[:size]


def build_tree(root: Path, size_mb: int) -> None:
    marker = root / ".complete"
    if marker.exists() and marker.read_text() == str(size_mb):
        return
    shutil.rmtree(root, ignore_errors=True)
    pool = _pool()
    total = size_mb << 20
    large_bytes = total * 6 // 10
    (root / "usr/lib").mkdir(parents=True)
    index = 0
    for _ in range(large_bytes // LARGE_FILE):
        path = root / "usr/lib" / f"libbig{index}.so"
        path.write_bytes(_content(pool, index, LARGE_FILE))
        index += 1
    rng = random.Random(SEED + 1)
    small_total = total - large_bytes
    written = 0
    while written < small_total:
        directory = root / "usr/share" / f"pkg{index % SMALL_DIRS}"
        directory.mkdir(parents=True, exist_ok=True)
        size = rng.randint(512, 40 * 1024)
        (directory / f"file{index}.txt").write_bytes(_content(pool, index, size))
        written += size
        index += 1
    (root / "bin").symlink_to("usr/bin")
    (root / "usr/bin").mkdir()
    (root / "usr/bin/sh").symlink_to("/bin/bash")
    (root / "dev").mkdir()
    os.mknod(root / "dev/null", 0o666 | 0o020000, os.makedev(1, 3))
    marker.write_text(str(size_mb))


def modify_fraction(root: Path, fraction: float, round_: int) -> int:
    """Rewrite files (largest first, then small ones) until `fraction` of the bytes changed."""
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and p.name[0] != "."),
        key=lambda p: str(p),
    )
    total = sum(p.stat().st_size for p in files)
    goal = int(total * fraction)
    rng = random.Random(SEED + round_)
    changed = 0
    for path in rng.sample(files, len(files)):
        if changed >= goal:
            break
        data = bytearray(path.read_bytes())
        data[:16] = rng.randbytes(16)
        path.write_bytes(bytes(data))
        changed += len(data)
    return changed


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its waited-for children (tar, zstd)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(action: Callable[[], None], reset: Callable[[], None]) -> tuple[float, float]:
    reset()
    subprocess.run(["sync"], check=True)  # earlier runs' dirty pages do not bill this one
    cpu = _cpu_seconds()
    start = time.perf_counter()
    action()
    return time.perf_counter() - start, _cpu_seconds() - cpu


MEDIANS: dict[str, float] = {}
# CPU seconds of each side's fastest round: where the machine's cores are all busy, the
# throughput ratio can be no better than the ratio of these.
CPU: dict[str, tuple[float, float]] = {}


def side_by_side(
    runs: int,
    baseline: Callable[[], None],
    ours: Callable[[], None],
    reset: Callable[[], None],
    label: str = "",
) -> tuple[float, float]:
    """Alternate the two (the machine is shared; load drifts), keep each one's best.

    The median of the per-round ratios (baseline/ours, each pair measured back to back) is
    kept in MEDIANS[label]: on a loaded machine it shows how steady the best-of ratio is.
    """
    base_runs, our_runs = [], []
    for _ in range(runs):
        base_runs.append(_timed(baseline, reset))
        our_runs.append(_timed(ours, reset))
    MEDIANS[label] = statistics.median(
        b[0] / o[0] for b, o in zip(base_runs, our_runs, strict=True)
    )
    best_base, best_ours = min(base_runs), min(our_runs)
    CPU[label] = (best_base[1], best_ours[1])
    return best_base[0], best_ours[0]


def tree_bytes(root: Path) -> int:
    out = subprocess.run(["du", "-sb", "--apparent-size", str(root)], capture_output=True)
    return int(out.stdout.split()[0])


def measure_incremental(
    tree: Path, store_dir: Path, runs: int
) -> tuple[int, float, int, float, int]:
    """Change 5 % of the generated tree; time a delta over "full" against a full snapshot."""
    changed = modify_fraction(tree, 0.05, 1)
    store = SnapshotStore(store_dir)
    rounds = iter(range(100))

    def delta() -> None:
        store.create(tree, f"delta{next(rounds)}", stage="bench", parent="full")

    def full_again() -> None:
        store.create(tree, f"full{next(rounds)}", stage="bench", full=True)

    t_delta, t_full = side_by_side(runs, delta, full_again, lambda: None, "i")
    delta_size = store.get("delta0").archive_size  # type: ignore[union-attr]
    full_size = store.get("full").archive_size  # type: ignore[union-attr]
    return changed, t_delta, delta_size, t_full, full_size


def memory_dir(needed: int) -> Path | None:
    """A tmpfs directory with room for a restored tree, if the machine has one."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 2 * needed:
        return shm / "lfsorch-bench"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/lfsorch-bench"))
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--tree",
        type=Path,
        help="measure an existing tree instead (a real LFS partition): read, never modified, "
        "so the incremental half is skipped",
    )
    args = parser.parse_args()
    load_before = os.getloadavg()
    work: Path = args.dir
    work.mkdir(parents=True, exist_ok=True)
    if args.tree is not None:
        tree = args.tree.resolve()
        print(f"measuring the existing tree {tree} (not modified)", flush=True)
    else:
        tree = work / "tree"
        print(f"building/reusing tree in {tree} ...", flush=True)
        build_tree(tree, args.size_mb)
    size = tree_bytes(tree)
    mb = size / 1e6
    files = sum(1 for _ in tree.rglob("*"))
    print(f"tree: {mb:.0f} MB, {files} entries")
    store_dir = work / "store"
    baseline_zst = work / "baseline.tar.zst"

    def clear_store() -> None:
        shutil.rmtree(store_dir, ignore_errors=True)
        baseline_zst.unlink(missing_ok=True)

    # Warm the page cache for both sides (through cat: GNU tar skips reading for /dev/null).
    subprocess.run(f"tar -C {tree} -cf - . | cat > /dev/null", shell=True, check=True)

    def pipeline_create() -> None:
        subprocess.run(
            f"tar -C {tree} -cf - . | zstd -q -T0 -3 -o {baseline_zst}", shell=True, check=True
        )

    def our_create() -> None:
        SnapshotStore(store_dir).create(tree, "full", stage="bench", full=True)

    t_pipe_c, t_ours_c = side_by_side(args.runs, pipeline_create, our_create, clear_store, "c")
    pipeline_create()  # both archives exist for the restore half

    # Restoring 1 GB onto a disk is often bound by the kernel's writeback rather than by
    # either tool; restoring into memory measures what the tools themselves cost.
    targets = {"disk": work / "restored"}
    in_memory = memory_dir(size)
    if in_memory is not None:
        targets["memory"] = in_memory / "restored"
    restores: dict[str, tuple[float, float]] = {}
    for where, restore_dir in targets.items():
        restore_dir.parent.mkdir(parents=True, exist_ok=True)

        def clear_restore(target: Path = restore_dir) -> None:
            shutil.rmtree(target, ignore_errors=True)

        def pipeline_restore(target: Path = restore_dir) -> None:
            target.mkdir()
            subprocess.run(
                f"zstd -q -d -c {baseline_zst} | tar -C {target} -xf -", shell=True, check=True
            )

        def our_restore(target: Path = restore_dir) -> None:
            SnapshotStore(store_dir).restore("full", target)

        restores[where] = side_by_side(
            args.runs, pipeline_restore, our_restore, clear_restore, f"r-{where}"
        )
        clear_restore()
    if in_memory is not None:
        shutil.rmtree(in_memory, ignore_errors=True)

    incremental = None if args.tree is not None else measure_incremental(tree, store_dir, args.runs)

    def rate(seconds: float, cpu: float) -> str:
        return f"{seconds:6.2f} s  {mb / seconds:7.0f} MB/s  cpu {cpu:5.2f} s"

    def verdict(label: str, base: float, ours: float) -> str:
        return (
            f"   ratio {base / ours:.2f} >= 0.9  (median of rounds {MEDIANS[label]:.2f};"
            f" cpu ratio {CPU[label][0] / CPU[label][1]:.2f})"
        )

    print()
    print(f"{os.cpu_count()} cores; cpu = CPU seconds of each side's fastest round "
          "(its threads and child processes)")  # fmt: skip
    print("load average (1, 5, 15 min) at start: {:.2f} {:.2f} {:.2f}".format(*load_before)
          + ", at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))  # fmt: skip
    print(f"snapshot          tar|zstd -T0 -3 : {rate(t_pipe_c, CPU['c'][0])}")
    print(f"snapshot          lfsorch         : {rate(t_ours_c, CPU['c'][1])}"
          + verdict("c", t_pipe_c, t_ours_c))  # fmt: skip
    for where, (t_pipe_r, t_ours_r) in restores.items():
        label = f"r-{where}"
        print(f"restore ({where:6}) zstd -d|tar -x  : {rate(t_pipe_r, CPU[label][0])}")
        print(f"restore ({where:6}) lfsorch         : {rate(t_ours_r, CPU[label][1])}"
              + verdict(label, t_pipe_r, t_ours_r))  # fmt: skip
    if incremental is not None:
        changed, t_delta, delta_size, t_full2, full_size = incremental
        print(f"incremental ({changed / 1e6:.0f} MB = {changed / size:.1%} changed): "
              f"{t_delta:.2f} s, archive {delta_size / 1e6:.0f} MB; full {t_full2:.2f} s, "
              f"{full_size / 1e6:.0f} MB; ratio {t_delta / t_full2:.3f} <= 0.15"
              f"  (median of rounds {MEDIANS['i']:.3f})")  # fmt: skip
    ok = (
        t_pipe_c / t_ours_c >= 0.9
        and all(base / ours >= 0.9 for base, ours in restores.values())
        and (incremental is None or incremental[1] / incremental[3] <= 0.15)
    )
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
