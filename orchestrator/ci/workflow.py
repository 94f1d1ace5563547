"""The workflow file of a split plan, for GitHub Actions or GitLab CI.

Each job installs lfsorch, fetches the sources, and runs `lfsorch ci job` for its slice:
that command pulls the lock's host image and the previous job's checkpoint image, builds the
slice, and pushes its own checkpoint image (or builds nothing when the registry already has
it). The report and the logs are uploaded whatever happened.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from orchestrator.ci.slices import Slice

Format = Literal["github", "gitlab"]
HOME = "lfsorch-home"  # the workspace, inside the checkout: artifacts can name it
PARTITION = "/mnt/lfs"
REPORT = "lfsorch-report.json"


@dataclass(frozen=True)
class Jobs:
    """What every job of the workflow shares."""

    stage_files: list[str]  # as given, relative to the repository's top
    lock: str
    registry: str
    source_set: str
    overrides: list[str]
    max_minutes: int
    command: str  # how `lfsorch ci plan` was run, for the header


def registry_host(registry: str) -> str | None:
    """The registry host of `HOST[:PORT]/PATH`, None for Docker Hub."""
    first = registry.split("/", 1)[0]
    return (
        first
        if "/" in registry and ("." in first or ":" in first or first == "localhost")
        else None
    )


def _q(words: Sequence[str]) -> str:
    return " ".join(shlex.quote(word) for word in words)


def job_command(jobs: Jobs, piece: Slice, lfsorch: str = "lfsorch") -> str:
    words = ["ci", "job", *jobs.stage_files, "--lock", jobs.lock, "--registry", jobs.registry]
    words += ["--until", piece.until]
    if piece.after is not None:
        words += ["--after", piece.after]
    # The lock fixes the set; an `-o source_set=` of the plan's command line is that one.
    kept = [o for o in jobs.overrides if not o.replace(" ", "").startswith("source_set=")]
    for override in [f"source_set={jobs.source_set}", *kept]:
        words += ["-o", override]
    return f'{lfsorch} {_q(words)} --lfs "$LFS"'


def fetch_command(jobs: Jobs, lfsorch: str = "lfsorch") -> str:
    return f"{lfsorch} {_q(['sources', 'fetch', *jobs.stage_files, '--set', jobs.source_set])}"


def _login(jobs: Jobs, docker: str) -> str:
    host = registry_host(jobs.registry)
    where = f" {shlex.quote(host)}" if host else ""  # none: Docker Hub
    return (
        'if [ -n "${REGISTRY_PASSWORD:-}" ]; then printf %s "$REGISTRY_PASSWORD" | '
        f'{docker} login{where} -u "$REGISTRY_USER" --password-stdin; fi'
    )


def _header(jobs: Jobs, slices: Sequence[Slice]) -> str:
    lines = [
        f"# Written by `{jobs.command}`.",
        f"# {len(slices)} job(s) of at most {jobs.max_minutes} min; estimated build time:",
    ]
    for number, piece in enumerate(slices, start=1):
        after = f" (from the checkpoint after {piece.after})" if piece.after else ""
        lines.append(f"#   {number}. {piece.label}: {piece.seconds / 60:.1f} min{after}")
    lines.append("# Each job builds nothing when its checkpoint image is already in the registry.")
    return "\n".join(lines) + "\n"


def github(jobs: Jobs, slices: Sequence[Slice]) -> dict[str, Any]:
    # Snapshots read and restore files of every owner: lfsorch runs as root.
    root = 'sudo -E env "PATH=$PATH"'
    lfsorch = f"{root} lfsorch"
    workflow_jobs: dict[str, Any] = {}
    for number, piece in enumerate(slices, start=1):
        job: dict[str, Any] = {
            "name": f"{number}/{len(slices)}: {piece.label}",
            "runs-on": "ubuntu-latest",
            "timeout-minutes": jobs.max_minutes,
        }
        if number > 1:
            job["needs"] = f"slice-{number - 1}"
        job["steps"] = [
            {"uses": "actions/checkout@v4"},
            {"uses": "actions/setup-python@v5", "with": {"python-version": "3.11"}},
            {"name": "install lfsorch", "run": "python -m pip install ."},
            {
                "name": "log in to the registry",
                "env": {
                    "REGISTRY_USER": "${{ secrets.REGISTRY_USER }}",
                    "REGISTRY_PASSWORD": "${{ secrets.REGISTRY_PASSWORD }}",
                },
                "run": _login(jobs, f"{root} docker"),
            },
            {"name": "fetch the sources", "run": fetch_command(jobs, lfsorch)},
            {
                "name": f"build {piece.label}",
                "run": f'sudo mkdir -p "$LFS"\n{job_command(jobs, piece, lfsorch)}',
            },
            {
                "name": "write the report",
                "if": "always()",
                "run": f"{lfsorch} report --json > {REPORT} || true",
            },
            {
                "name": "upload the report and logs",
                "if": "always()",
                "uses": "actions/upload-artifact@v4",
                "with": {
                    "name": f"slice-{number}-report",
                    "path": f"{REPORT}\n{HOME}/runs/\n",
                    "if-no-files-found": "ignore",
                },
            },
        ]
        workflow_jobs[f"slice-{number}"] = job
    return {
        "name": f"lfsorch {' '.join(jobs.stage_files)}",
        "on": {"workflow_dispatch": {}},
        "env": {"LFSORCH_HOME": "${{ github.workspace }}/" + HOME, "LFS": PARTITION},
        "jobs": workflow_jobs,
    }


def gitlab(jobs: Jobs, slices: Sequence[Slice]) -> dict[str, Any]:
    """Jobs for a shell runner that runs as root beside a Docker engine."""
    names = [f"slice-{number}" for number in range(1, len(slices) + 1)]
    document: dict[str, Any] = {
        "stages": names,
        "variables": {"LFSORCH_HOME": f"$CI_PROJECT_DIR/{HOME}", "LFS": PARTITION},
    }
    for number, piece in enumerate(slices, start=1):
        document[names[number - 1]] = {
            "stage": names[number - 1],
            "timeout": f"{jobs.max_minutes} minutes",
            "script": [
                "python3 -m pip install .",
                _login(jobs, "docker"),
                fetch_command(jobs),
                'mkdir -p "$LFS"',
                job_command(jobs, piece),
            ],
            "after_script": [f"lfsorch report --json > {REPORT} || true"],
            "artifacts": {
                "name": f"slice-{number}-report",
                "when": "always",
                "paths": [REPORT, f"{HOME}/runs/"],
                "expire_in": "1 week",
            },
        }
    return document


class _Dumper(yaml.SafeDumper):
    """Multi-line scripts as literal blocks, the way people write them in workflow files."""


def _string(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _string)


def render(kind: Format, jobs: Jobs, slices: Sequence[Slice]) -> str:
    document = github(jobs, slices) if kind == "github" else gitlab(jobs, slices)
    body = yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=1000)
    return _header(jobs, slices) + body
