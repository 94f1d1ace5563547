"""The entry script's counters routine on a real cgroup v2 hierarchy.

This engine runs cgroup v1; the kernel also mounts v2, without the controllers v1 holds
(memory, io, pids), but with its core CPU accounting. A container whose /sys/fs/cgroup is a
fresh v2 cgroup, its PID 1 moved into it, runs the same routine the EXIT trap and a kill run:
it must take the v2 branch and give the CPU time from the kernel's own `cpu.stat`.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from orchestrator.execution import engine
from orchestrator.execution.container import COUNTERS_COPY, FIGURES_FILE, FIGURES_MOUNT
from orchestrator.monitor.metrics import CgroupCounters, ContainerFigures
from tests.helpers import BASE_IMAGE

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leftovers")]

# Some tenths of a second of CPU (counted in work, not in time: the host may be loaded) in a
# child of PID 1, once PID 1 sits in the v2 cgroup.
BUSY = f"""
while [ ! -e {FIGURES_MOUNT}/go ]; do sleep 0.05; done
bash -c 'i=0; while [ $i -lt 300000 ]; do i=$((i + 1)); done'
{COUNTERS_COPY}
"""


@pytest.fixture
def v2_cgroup(tmp_path: Path) -> Iterator[Path]:
    """A fresh cgroup in a cgroup2 mount of this host, removed and unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting cgroup2 needs root")
    root = tmp_path / "cgroup2"
    root.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "cgroup2", "none", str(root)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"no cgroup2 here: {mounted.stderr.strip()}")
    probe = root / f"lfsorch-test-{os.getpid()}"
    try:
        probe.mkdir()
        yield probe
    finally:
        for _ in range(50):  # empty once the container's processes are gone
            try:
                probe.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
        subprocess.run(["umount", str(root)], check=False)


def test_the_counters_routine_reads_a_real_v2_hierarchy(
    docker_client: docker.DockerClient, v2_cgroup: Path, tmp_path: Path
) -> None:
    figures_dir = tmp_path / "figures"
    figures_dir.mkdir()
    container = docker_client.containers.run(
        BASE_IMAGE,
        ["bash", "-c", BUSY],
        detach=True,
        labels=engine.owner_labels("build", run="cgroup-v2-test", stage="t", package="p"),
        volumes={
            str(v2_cgroup): {"bind": "/sys/fs/cgroup", "mode": "rw"},
            str(figures_dir): {"bind": FIGURES_MOUNT, "mode": "rw"},
        },
        network_mode="none",
    )
    try:
        container.reload()
        (v2_cgroup / "cgroup.procs").write_text(str(container.attrs["State"]["Pid"]))
        (figures_dir / "go").touch()
        assert container.wait(timeout=60)["StatusCode"] == 0
    finally:
        container.remove(force=True)
    text = (figures_dir / FIGURES_FILE).read_text()
    assert "== cpu.stat\nusage_usec " in text  # the v2 branch, the kernel's own file
    counters = CgroupCounters.parse(text)
    # The busy loop's, and nothing of the host's: the cgroup holds this container alone.
    assert counters.cpu_seconds is not None and 0.05 <= counters.cpu_seconds < 30
    # Held by v1 on this host: absent from v2, so unknown, never zero or a guess.
    assert (counters.memory_peak_bytes, counters.pids_peak) == (None, None)
    figures = ContainerFigures()
    assert figures.read_counters_file(figures_dir / FIGURES_FILE)
    assert (figures.cpu_seconds, figures.io_source) == (counters.cpu_seconds, "cgroup")
