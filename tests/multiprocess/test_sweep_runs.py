"""Sweep trials that really train: the local grid (its ranked table, ``--trial``, skipping
finished trials, refusing a changed file) and, for W&B, everything short of the server: the sweep
config passes W&B's own schema, and the command W&B's own agent code builds from it runs a real
trial through the CLI."""

from __future__ import annotations

import csv
import json
import math
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from helpers import ONE_PROCESS, ROOT, check, make_image_folder, tiny_grid
from wandb_records import config as wandb_config_of
from wandb_records import history, read_records, run_id

from anemia_dist import sweep
from anemia_dist.cli import main
from anemia_dist.run_dir import CONFIG, SUMMARY

pytestmark = pytest.mark.multiprocess


def read_table(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_local_grid_runs_trials_in_their_own_directories_ranks_them_and_skips_finished_ones(
    tmp_path, capfd, monkeypatch
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = make_image_folder(tmp_path / "data", {"anemic": 12, "non-anemic": 12})
    path = tiny_grid(tmp_path / "hidden.yaml", data, tmp_path / "runs", **{"model.hidden": {"values": [8, 16]}})
    directory = tmp_path / "runs" / "sweep-hidden"  # the default: run.output_dir/sweep-<file name>

    def run_sweep(*args: str) -> tuple[int, str, str]:
        code = main(["sweep", "run", str(path), "--launch-args", ONE_PROCESS, *args])
        out, err = capfd.readouterr()
        return code, out, err

    code, out, err = run_sweep("--trial", "1")  # as one SLURM array task would
    assert code == 0, err[-3000:]
    assert not (directory / "trial-000").exists() and (directory / "trial-001" / SUMMARY).is_file()
    assert [(r["trial"], r["status"]) for r in read_table(directory / sweep.TABLE_FILE)] == [
        ("trial-001", "finished"), ("trial-000", "not run")
    ]  # fmt: skip
    assert "trial-000  not run" in out

    code, out, err = run_sweep()
    assert code == 0, err[-3000:]
    assert "trial-001: finished earlier, skipped" in out
    assert out.count("accelerate.commands.launch") == 1  # only trial-000 trained
    losses = {}
    for name, hidden in (("trial-000", 8), ("trial-001", 16)):
        run_dir = directory / name
        assert yaml.safe_load((run_dir / CONFIG).read_text())["model"]["hidden"] == hidden
        losses[name] = json.loads((run_dir / SUMMARY).read_text())["best_val_loss"]
    table = read_table(directory / sweep.TABLE_FILE)
    assert [r["trial"] for r in table] == sorted(losses, key=losses.get)  # ranked by best validation loss
    assert [r["rank"] for r in table] == ["1", "2"] and {r["status"] for r in table} == {"finished"}
    for row in table:
        assert math.isclose(float(row["best_val_loss"]), losses[row["trial"]], rel_tol=1e-12)
        assert row["model.hidden"] == str(8 if row["trial"] == "trial-000" else 16)
    assert "best_val_loss" in out and f"table: {directory / sweep.TABLE_FILE}" in out

    code, out, _ = run_sweep()
    assert code == 0 and out.count("finished earlier, skipped") == 2 and "accelerate.commands.launch" not in out

    tiny_grid(path, data, tmp_path / "runs", **{"model.hidden": {"values": [8, 32]}})  # edited in place
    code, _, err = run_sweep()
    assert code == 2 and "its trials differ from those in" in err
    assert read_table(directory / sweep.TABLE_FILE) == table  # nothing lost


def schema_violations(config: dict) -> list[str]:
    with warnings.catch_warnings():  # sweeps 0.2 names pydantic v1 settings
        warnings.simplefilter("ignore")
        import sweeps
    return sweeps.schema_violations_from_proposed_config(config)


@pytest.fixture
def agent_command(tmp_path, monkeypatch, capsys):
    """The command W&B's own agent code builds for one trial of ``sweep init``'s config, and its environment."""
    from wandb import wandb_agent

    data = make_image_folder(tmp_path / "data", {"anemic": 12, "non-anemic": 12})
    path = tiny_grid(tmp_path / "lr.yaml", data, tmp_path / "runs", **{"optim.lr": {"values": [1.0e-3, 3.0e-4]}})
    assert main(["sweep", "init", str(path), "--dry-run"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert schema_violations(config) == []
    assert schema_violations(yaml.safe_load(path.read_text())) != []  # the file itself is not W&B's: it is translated

    started = []

    class Recorder:  # in place of the process W&B's agent would start
        def __init__(self, command=None, env=None, **_):
            started.append((command, env))

    for name in ("WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH"):  # the agent sets these in its own environment
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("WANDB_SWEEP_ID", "swp123")  # as `wandb agent` does
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv(sweep.LAUNCH_ARGS_ENV, ONE_PROCESS)
    monkeypatch.setattr(wandb_agent, "AgentProcess", Recorder)
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id="swp123")
    agent._sweep_command = config["command"]
    agent._command_run({"run_id": "trial7", "program": config["program"], "args": {"optim.lr": {"value": 3e-4}}})
    ((command, env),) = started
    return command, env, tmp_path


def test_wandb_agent_command_runs_an_ordinary_accelerate_launch_training_trial(agent_command):
    command, env, root = agent_command
    assert command[:6] == ["/usr/bin/env", "python", "-m", "anemia_dist", "sweep", "trial"]
    assert command[-1] == "optim.lr=0.0003"
    python = str(Path(sys.executable).parent)
    result = check(
        subprocess.run(
            command,
            env={**env, "PATH": f"{python}:{env['PATH']}"},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
    )
    launched = shlex.split(result.stdout.splitlines()[0].removeprefix("anemia-dist sweep trial: "))
    assert launched[1:3] == ["-m", "accelerate.commands.launch"] and launched[3:11] == shlex.split(ONE_PROCESS)
    assert launched[11:14] == ["-m", "anemia_dist", "train"]
    assert launched[-5:] == [
        "optim.lr=0.0003", f"run.output_dir={root / 'runs' / 'sweep-swp123'}", "run.name=trial7", "run.resume=auto",
        "tracking.wandb=online",
    ]  # fmt: skip
    run_dir = root / "runs" / "sweep-swp123" / "trial7"
    assert yaml.safe_load((run_dir / CONFIG).read_text())["optim"]["lr"] == 3e-4
    assert json.loads((run_dir / SUMMARY).read_text())["epochs_run"] == 1
    (offline,) = (root / "wandb").glob("offline-run-*-trial7")
    records = read_records(next(offline.glob("run-*.wandb")))
    assert run_id(records) == "trial7"  # the agent's run: W&B files the result under the sweep
    assert wandb_config_of(records)["optim.lr"] == 3e-4  # the parameter file the agent wrote
    assert [row["epoch"] for row in history(records)] == [1]
