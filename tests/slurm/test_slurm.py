"""The SLURM batch scripts on a real one-node SLURM cluster (slurmctld + slurmd on localhost).

The session fixture starts the cluster with ``slurm/local_cluster.sh`` in a temporary directory
and stops its daemons at the end; it needs root and Debian's ``slurm-wlm`` and ``munge``
packages, and the tests skip without them. Jobs run the scripts' CPU mode with 2 processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from helpers import TINY, check, free_port, make_image_folder, make_manifest, run_cli, script
from slurm_jobs import (
    FINISHED,
    SLURM,
    all_tasks_finished,
    epochs_printed,
    job_info,
    output_of,
    run_job,
    submit,
    wait_for,
)

from anemia_dist import sweep
from anemia_dist.preemption import PREEMPTED_EXIT_CODE
from anemia_dist.run_dir import BEST, CONFIG, OOF_PREDICTIONS, STUDY_JSON, SUMMARY, WEIGHTS, read_metrics

SCRIPTS = [SLURM / name for name in ("lib.sh", "node_launch.sh", "local_cluster.sh")] + sorted(SLURM.glob("*.sbatch"))


def test_scripts_parse_and_agree_on_the_preemption_exit_code():
    for path in SCRIPTS:
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, f"{path.name}: {result.stderr}"
    assert re.search(rf"^PREEMPTED_EXIT_CODE={PREEMPTED_EXIT_CODE}$", (SLURM / "lib.sh").read_text(), re.M)


def test_local_cluster_refuses_to_start_without_root_or_slurm(tmp_path):
    """The helper fails with a message saying what is missing, instead of half-starting daemons."""
    env = {**os.environ, "PATH": "/usr/bin:/bin"}  # not /usr/sbin, where the daemons live
    result = subprocess.run(
        ["/bin/bash", str(SLURM / "local_cluster.sh"), "up", str(tmp_path / "state")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "must run as root" in result.stderr or "apt-get install -y slurm-wlm munge" in result.stderr
    assert not (tmp_path / "state").exists()


@pytest.fixture(scope="session")
def slurm_env():
    """Environment for SLURM clients pointing at a private local cluster, up for the whole session."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root")
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"SLURM not installed ({', '.join(missing)} missing): apt-get install -y slurm-wlm munge")
    # Not under pytest's private temporary folder: munged needs every folder above its socket searchable.
    state = Path(tempfile.mkdtemp(prefix="anemia-dist-slurm-"))
    state.chmod(0o755)
    ports = {"SLURMCTLD_PORT": str(free_port()), "SLURMD_PORT": str(free_port())}
    command = [str(SLURM / "local_cluster.sh")]
    try:
        up = subprocess.run(
            [*command, "up", str(state)], env={**os.environ, **ports}, capture_output=True, text=True, timeout=120
        )
        assert up.returncode == 0, f"local cluster did not start:\n{up.stderr}"
        conf = re.search(r"^export SLURM_CONF=(\S+)$", up.stdout, re.M).group(1)
        venv_bin = str(Path(sys.executable).parent)
        yield {**os.environ, "SLURM_CONF": conf, "PATH": f"{venv_bin}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    finally:
        down = subprocess.run([*command, "down", str(state)], capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr


def train_args(tmp_path: Path, epochs: int) -> list[str]:
    data = make_image_folder(tmp_path / "data", {"anemic": 12, "non-anemic": 12})
    return [
        *TINY,
        f"data.root={data}",
        f"train.epochs={epochs}",
        "early_stopping.patience=100",
        f"run.output_dir={tmp_path / 'runs'}",
    ]


@pytest.mark.slurm
@pytest.mark.multiprocess
def test_single_node_job_trains_on_two_ranks_into_a_run_directory_named_after_the_job(slurm_env, tmp_path):
    job, info = run_job(slurm_env, tmp_path, "train_single_node.sbatch", train_args(tmp_path, epochs=2))
    output = output_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", output[-5000:]
    assert f"job {job} SLURM_RESTART_COUNT=0" in output
    run_dir = tmp_path / "runs" / f"slurm-{job}"
    summary = json.loads((run_dir / SUMMARY).read_text())
    assert summary["world_size"] == 2 and summary["epochs_run"] == 2
    assert [row["epoch"] for row in read_metrics(run_dir)] == [1, 2]
    assert (run_dir / BEST / WEIGHTS).is_file()
    assert epochs_printed(output) == [1, 2]


@pytest.mark.slurm
@pytest.mark.multiprocess
def test_multi_node_script_starts_one_launcher_per_node_with_its_machine_rank(slurm_env, tmp_path):
    """One node here, but through the same srun, per-node rank expansion and head-node lookup."""
    job, info = run_job(
        slurm_env,
        tmp_path,
        "train_multi_node.sbatch",
        train_args(tmp_path, epochs=1),
        sbatch_args=("--nodes=1", f"--export=ALL,MAIN_PROCESS_PORT={free_port()}"),
    )
    output = output_of(tmp_path, job, "anemia-dist-multinode")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", output[-5000:]
    assert "1 node(s) x 2 process(es)" in output
    summary = json.loads((tmp_path / "runs" / f"slurm-{job}" / SUMMARY).read_text())
    assert summary["world_size"] == 2


@pytest.mark.slurm
@pytest.mark.multiprocess
def test_signalled_job_checkpoints_requeues_itself_and_resumes_to_the_end(slurm_env, tmp_path):
    epochs = 5
    job = submit(slurm_env, tmp_path, "train_single_node.sbatch", train_args(tmp_path, epochs))
    run_dir = tmp_path / "runs" / f"slurm-{job}"
    try:
        # Signal once training is under way (the ranks have their handlers), as --signal would.
        deadline = time.monotonic() + 180
        while not read_metrics(run_dir):
            assert time.monotonic() < deadline, output_of(tmp_path, job)[-5000:]
            assert job_info(slurm_env, job)["JobState"] in ("PENDING", "RUNNING"), output_of(tmp_path, job)[-5000:]
            time.sleep(0.5)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm_env, check=True)
        wait_for(slurm_env, job, lambda i: int(i["Restarts"]) >= 1, timeout=120)
        info = wait_for(slurm_env, job, lambda i: i["JobState"] in FINISHED and int(i["Restarts"]) >= 1)
    finally:
        subprocess.run(["scancel", job], env=slurm_env, capture_output=True)
    output = output_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", output[-5000:]
    assert info["Restarts"] == "1"
    first, _, second = output.partition(f"job {job} SLURM_RESTART_COUNT=1")
    assert second, output[-5000:]
    assert f"job {job} SLURM_RESTART_COUNT=0" in first and "requeueing job" in first
    # The second start continued from the checkpoint instead of epoch 1, and the run is whole.
    before, after = epochs_printed(first), epochs_printed(second)
    assert before and after and after[0] > 1, output[-5000:]
    assert before + after == list(range(1, epochs + 1))
    assert [row["epoch"] for row in read_metrics(run_dir)] == list(range(1, epochs + 1))
    assert json.loads((run_dir / SUMMARY).read_text())["best_epoch"] is not None


@pytest.mark.slurm
@pytest.mark.multiprocess
def test_sweep_agent_array_runs_one_trial_per_task_as_an_accelerate_launch_run(slurm_env, tmp_path):
    """Each array task starts an agent (W&B's own agent code behind a stand-in ``wandb`` command:
    there is no server here) whose trial trains with the processes this job's script chose."""
    data = make_image_folder(tmp_path / "data", {"anemic": 12, "non-anemic": 12})
    sweep_file = tmp_path / "lr.yaml"
    overrides = [*TINY, f"data.root={data}", "train.epochs=1", f"run.output_dir={tmp_path / 'runs'}"]
    sweep_file.write_text(
        yaml.safe_dump({"method": "grid", "overrides": overrides, "parameters": {"optim.lr": {"values": [1e-3, 3e-4]}}})
    )
    (tmp_path / "sweep.json").write_text(json.dumps(sweep.wandb_config(sweep.load_sweep(sweep_file))))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "wandb"
    fake.write_text(f'#!/bin/sh\nexec {sys.executable} {script("fake_wandb_agent.py")} "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{slurm_env['PATH']}", "FAKE_SWEEP_CONFIG": str(tmp_path / "sweep.json")}
    env |= {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "CPU_PROCESSES": "1"}
    job = submit(slurm_env, tmp_path, "sweep_agent.sbatch", ["lab/anemia/swp9"], ("--array=0-1",), env=env)
    try:
        wait_for(slurm_env, job, lambda _: all_tasks_finished(slurm_env, job, 2), timeout=600)
    finally:
        subprocess.run(["scancel", job], env=slurm_env, capture_output=True)
    for task, lr in ((0, 1e-3), (1, 3e-4)):
        output = (tmp_path / f"slurm-anemia-dist-sweep-{job}_{task}.out").read_text()
        assert f"task {task} on" in output and "agent for sweep lab/anemia/swp9, 1 trial(s)" in output, output[-4000:]
        assert "--config_file accelerate_configs/cpu_2proc.yaml --num_processes 1" in output
        run_dir = tmp_path / "runs" / "sweep-swp9" / f"task{task}"
        assert yaml.safe_load((run_dir / CONFIG).read_text())["optim"]["lr"] == lr, output[-4000:]
        assert json.loads((run_dir / SUMMARY).read_text())["epochs_run"] == 1
    assert sorted(p.name.rsplit("-", 1)[-1] for p in (tmp_path / "wandb").glob("offline-run-*")) == ["task0", "task1"]


@pytest.mark.slurm
@pytest.mark.multiprocess
def test_study_array_runs_one_fold_per_task_requeues_a_preempted_task_alone_and_pools_as_one_launch(
    slurm_env, tmp_path
):
    """Fold K in array task K; task 1 is signalled mid-training, requeued alone and resumes; the pooling
    job's study.json equals that of the same study run in one launch."""
    data = make_manifest(tmp_path / "data", {"anemic": 12, "non-anemic": 12}, per_group=1)
    args = [*TINY, f"data.manifest={data}", "data.val_fraction=0.34", "train.epochs=4", "early_stopping.patience=100"]
    args += ["study.folds=2", "eval.bootstrap=200", "run.name=cv2", "optim.lr=0.003"]
    env = {"CPU_PROCESSES": "1"}
    job = submit(
        slurm_env,
        tmp_path,
        "study_array.sbatch",
        [*args, f"run.output_dir={tmp_path / 'runs'}"],
        ("--array=0-1",),
        env=env,
    )
    fold1 = tmp_path / "runs" / "cv2" / "fold-1"
    try:
        deadline = time.monotonic() + 300
        while not read_metrics(fold1):
            assert time.monotonic() < deadline, "fold 1 never trained an epoch"
            output = "".join(p.read_text() for p in tmp_path.glob(f"slurm-anemia-dist-study-{job}_*.out"))
            assert not all_tasks_finished(slurm_env, job, 2), output[-5000:]
            time.sleep(0.5)
        subprocess.run(["scancel", "--signal=USR1", "--batch", f"{job}_1"], env=slurm_env, check=True)
        wait_for(slurm_env, f"{job}_1", lambda i: int(i["Restarts"]) >= 1, timeout=120)
        wait_for(slurm_env, job, lambda _: all_tasks_finished(slurm_env, job, 2), timeout=600)
        tasks = {task: job_info(slurm_env, f"{job}_{task}") for task in (0, 1)}
        pool, info = run_job(
            slurm_env, tmp_path, "study_array.sbatch", [*args, f"run.output_dir={tmp_path / 'runs'}"], env=env
        )
    finally:
        subprocess.run(["scancel", job], env=slurm_env, capture_output=True)
    outputs = {task: (tmp_path / f"slurm-anemia-dist-study-{job}_{task}.out").read_text() for task in (0, 1)}
    assert all(t["JobState"] == "COMPLETED" for t in tasks.values()), outputs[1][-5000:]
    assert (tasks[0]["Restarts"], tasks[1]["Restarts"]) == ("0", "1")  # only the signalled task was requeued
    assert f"requeueing job {job}_1" in outputs[1] and "requeueing" not in outputs[0]
    pooled_output = "".join(p.read_text() for p in tmp_path.glob(f"slurm-anemia-dist-study-{pool}*.out"))
    assert info["JobState"] == "COMPLETED" and "2 of 2 folds" in pooled_output, pooled_output[-5000:]
    check(run_cli("study", *args, f"run.output_dir={tmp_path / 'one'}"))  # the same study in one launch
    arrayed = json.loads((tmp_path / "runs" / "cv2" / STUDY_JSON).read_text())
    single = json.loads((tmp_path / "one" / "cv2" / STUDY_JSON).read_text())
    assert arrayed["folds_done"] == 2 and arrayed["pooled"] == single["pooled"] and arrayed["folds"] == single["folds"]
    oof = [(tmp_path / run / "cv2" / OOF_PREDICTIONS).read_text() for run in ("runs", "one")]
    assert oof[0] == oof[1] and len(oof[0].splitlines()) == 25  # every image's probability, to the digit
