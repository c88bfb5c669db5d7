"""Submitting and watching jobs on the local SLURM clusters of the SLURM tests (no accounting database)."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from helpers import ROOT

SLURM = ROOT / "slurm"
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def submit(
    slurm_env: dict,
    workdir: Path,
    script: str | Path,
    args: list[str],
    sbatch_args: tuple[str, ...] = (),
    env: dict | None = None,
) -> str:
    """``sbatch`` of a script in ``slurm/`` (or any path) in CPU mode with 2 processes per node, from
    ``workdir`` (the job's output lands there)."""
    full_env = {**slurm_env, "ANEMIA_DIST_HOME": str(ROOT), "CPU_PROCESSES": "2", **(env or {})}
    command = ["sbatch", "--parsable", "--gres=none", *sbatch_args, str(SLURM / script), *args]
    result = subprocess.run(command, env=full_env, cwd=workdir, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_info(slurm_env: dict, job: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (there is no accounting database, so no ``sacct``)."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job], env=slurm_env, capture_output=True, text=True, check=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(slurm_env: dict, job: str, condition, timeout: float = 300) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(slurm_env, job)
        if condition(info):
            return info
        time.sleep(1)
    raise AssertionError(f"job {job} timed out waiting; last state {info.get('JobState')}: {info}")


def all_tasks_finished(slurm_env: dict, job: str, tasks: int) -> bool:
    """Every task of array job ``job`` has ended (each is one line of ``scontrol show job``)."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job], env=slurm_env, capture_output=True, text=True, check=True
    ).stdout
    states = re.findall(r"JobState=(\S+)", out)
    return len(states) == tasks and all(state in FINISHED for state in states)


def run_job(slurm_env: dict, workdir: Path, script: str, args: list[str], timeout: float = 300, **kwargs):
    job = submit(slurm_env, workdir, script, args, **kwargs)
    try:
        info = wait_for(slurm_env, job, lambda i: i["JobState"] in FINISHED, timeout)
    finally:
        subprocess.run(["scancel", job], env=slurm_env, capture_output=True)
    return job, info


def output_of(workdir: Path, job: str, name: str = "anemia-dist") -> str:
    return (workdir / f"slurm-{name}-{job}.out").read_text()


def epochs_printed(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"^epoch +(\d+) +train loss", text, re.M)]
