"""What lfsorch adds per package over a bare container start.

Measures, in one run and on the same image: N trivial packages built by `lfsorch run` (one
fresh container each, serial) against N sequential `docker run --rm IMAGE true`, and prints
the per-package times and their ratio. Target: the ratio is at most 1.25.

    python3 benchmarks/overhead.py [--packages 20] [--image lfsorch/base:bookworm]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_RATIO = 1.25


def bare_docker(image: str, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        subprocess.run(
            ["docker", "run", "--rm", "--network", "none", image, "true"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return (time.perf_counter() - started) / count


def lfsorch_run(image: str, count: int, scratch: Path) -> float:
    stage = scratch / "trivial.yaml"
    packages = "\n".join(f"  - {{name: p{n:03d}, script: 'true'}}" for n in range(count))
    stage.write_text(f"stage: trivial\nimage: {image}\npackages:\n{packages}\n")
    lfs = scratch / "lfs"
    lfs.mkdir(exist_ok=True)
    home = scratch / f"home-{time.monotonic_ns()}"
    env = {**os.environ, "LFSORCH_HOME": str(home)}
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", str(stage), "--lfs", str(lfs), "-j", "1"],
        check=True,
        stdout=subprocess.DEVNULL,
        env=env,
        cwd=REPO,
    )
    return (time.perf_counter() - started) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image", default="lfsorch/base:bookworm")
    args = parser.parse_args()
    bare: list[float] = []
    ours: list[float] = []
    with tempfile.TemporaryDirectory(prefix="lfsorch-bench-") as scratch:
        bare_docker(args.image, 2)  # warm the engine's caches for both sides alike
        for _ in range(args.rounds):
            bare.append(bare_docker(args.image, args.packages))
            ours.append(lfsorch_run(args.image, args.packages, Path(scratch)))
    bare_s, ours_s = statistics.median(bare), statistics.median(ours)
    ratio = ours_s / bare_s
    print(f"packages per round:            {args.packages} ({args.rounds} rounds, median)")
    print(f"docker run --rm {args.image} true: {bare_s * 1000:8.1f} ms per container")
    print(f"lfsorch run (one container each): {ours_s * 1000:8.1f} ms per package")
    print(f"ratio lfsorch / bare:            {ratio:8.2f}  (target <= {TARGET_RATIO})")
    print("verdict:", "meets target" if ratio <= TARGET_RATIO else "MISSES target")


if __name__ == "__main__":
    main()
