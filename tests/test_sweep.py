"""Sweeps: the sweep file's checks, the local grid run for real (its table, ``--trial``, skipping
finished trials), and for W&B everything short of the server: the sweep config passes W&B's own
schema, and the command W&B's own agent code builds from it runs a real trial through the CLI."""

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
from conftest import ROOT, TINY, check, make_image_folder
from wandb_records import config as wandb_config_of
from wandb_records import history, read_records, run_id

from anemia_dist import sweep
from anemia_dist.cli import main
from anemia_dist.config import ConfigError

ONE_PROCESS = "--num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no"


def write_sweep(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def grid(path: Path, data: Path | str, output: Path | str, **parameters) -> Path:
    overrides = [*TINY, f"data.root={data}", "train.epochs=1", f"run.output_dir={output}"]
    return write_sweep(path, method="grid", overrides=overrides, parameters=parameters)


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"optim.lrr": {"values": [1e-3]}}, "optim.lrr: unknown key (did you mean optim.lr?)"),
        ({"optimizer.lr": {"values": [1e-3]}}, "optimizer: unknown key"),
        ({"model.dropout": {"values": [0.2, 1.5]}}, "model.dropout: must be in [0, 1)"),
        ({"model.hidden": {"distribution": "int_uniform", "min": 0, "max": 8}}, "model.hidden: must be >= 1"),
        ({"optim.lr": {"distribution": "log_uniform", "min": -9, "max": -4}, "optim.lrr": {"value": 1}}, "optim.lrr"),
        ({"optim.lr": {"values": [None]}}, "parameters.optim.lr: null is not a sweep value"),
        ({"optim.lr": [1e-3]}, "parameters.optim.lr: give value: X, values: [X, Y] or distribution:"),
    ],
)
def test_a_bad_key_or_value_in_a_sweep_file_fails_before_any_trial_naming_it(tmp_path, capsys, parameters, named):
    path = write_sweep(tmp_path / "s.yaml", method="random", run_cap=2, parameters=parameters)
    for command in (["run", str(path), f"--dir={tmp_path / 'sweep'}"], ["init", str(path)]):
        assert main(["sweep", *command]) == 2
        message = capsys.readouterr().err
        assert f"{path}: " in message and named in message, message
    assert not (tmp_path / "sweep").exists()


def test_sweep_file_checks_name_the_top_level_key(tmp_path):
    cases = [
        ({"method": "grid", "parameters": {"optim.lr": {"values": [1]}}, "programme": "x"}, "programme: unknown key"),
        ({"method": "hyperband", "parameters": {"optim.lr": {"values": [1]}}}, "method: must be one of grid"),
        ({"method": "grid", "parameters": {}}, "parameters: needs at least one config key"),
        ({"method": "grid", "parameters": {"optim.lr": {"values": [1]}}, "config": "nope.yaml"}, "config: --config"),
        ({"method": "grid", "parameters": {"optim.lr": {"values": [1]}}, "overrides": "a=1"}, "overrides: must be"),
        ({"method": "random", "parameters": {"optim.lr": {"values": [1]}}, "seed": "x"}, "seed: must be an integer"),
    ]
    for spec, named in cases:
        with pytest.raises(ConfigError, match=f"^{tmp_path}/s.yaml: {named}"):
            sweep.load_sweep(write_sweep(tmp_path / "s.yaml", **spec))
    path = write_sweep(
        tmp_path / "s.yaml",
        method="grid",
        parameters={"optim.lr": {"min": 1e-4, "max": 1e-3, "distribution": "uniform"}},
    )
    with pytest.raises(ConfigError, match="a grid needs values"):
        sweep.local_trials(sweep.load_sweep(path))
    path = write_sweep(tmp_path / "s.yaml", method="bayes", parameters={"optim.lr": {"values": [1e-4]}})
    with pytest.raises(ConfigError, match="bayes needs the W&B server"):
        sweep.local_trials(sweep.load_sweep(path))


def test_base_config_is_read_beside_the_sweep_file_and_values_typed_as_the_config_reads_them(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 7\n")
    path = write_sweep(
        tmp_path / "s.yaml", method="grid", config="base.yaml", parameters={"optim.lr": {"values": ["1e-4", 3e-4]}}
    )
    loaded = sweep.load_sweep(path)
    assert loaded.config == str(tmp_path / "base.yaml")
    assert loaded.parameters["optim.lr"]["values"] == [1e-4, 3e-4]  # YAML read 1e-4 as text; W&B gets a number
    assert sweep.trial_config(loaded, {"optim.lr": 3e-4}).train.epochs == 7


def test_grid_runs_in_file_order_and_random_draws_repeat_per_seed(tmp_path):
    path = write_sweep(
        tmp_path / "g.yaml",
        method="grid",
        parameters={
            "model.hidden": {"values": [8, 16]},
            "optim.lr": {"values": [1e-3, 1e-4, 1e-5]},
            "train.seed": {"value": 3},
        },
    )
    trials = sweep.local_trials(sweep.load_sweep(path))
    assert [(t["model.hidden"], t["optim.lr"]) for t in trials] == [
        (8, 1e-3), (8, 1e-4), (8, 1e-5), (16, 1e-3), (16, 1e-4), (16, 1e-5)
    ]  # fmt: skip
    assert {t["train.seed"] for t in trials} == {3}

    parameters = {
        "optim.lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-2},
        "model.dropout": {"distribution": "uniform", "min": 0.1, "max": 0.6},
        "model.hidden": {"distribution": "int_uniform", "min": 8, "max": 64},
        "unfreeze.layers": {"values": [["layer4"], ["layer3", "layer4"]]},
    }
    draws = [
        sweep.local_trials(
            sweep.load_sweep(
                write_sweep(tmp_path / "r.yaml", method="random", run_cap=20, seed=s, parameters=parameters)
            )
        )
        for s in (0, 0, 1)
    ]
    assert draws[0] == draws[1] and draws[0] != draws[2] and len(draws[0]) == 20
    for trial in draws[0]:
        assert 1e-5 <= trial["optim.lr"] <= 1e-2 and 0.1 <= trial["model.dropout"] <= 0.6
        assert isinstance(trial["model.hidden"], int) and 8 <= trial["model.hidden"] <= 64
    # Log-uniform: about as many draws per decade (a uniform draw would put ~90 % in the top one).
    assert sum(t["optim.lr"] < 1e-3 for t in draws[0]) >= 8


def read_table(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.multiprocess
def test_local_grid_runs_trials_in_their_own_directories_ranks_them_and_skips_finished_ones(
    tmp_path, capfd, monkeypatch
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = make_image_folder(tmp_path / "data", {"anemic": 12, "non-anemic": 12})
    path = grid(tmp_path / "hidden.yaml", data, tmp_path / "runs", **{"model.hidden": {"values": [8, 16]}})
    directory = tmp_path / "runs" / "sweep-hidden"  # the default: run.output_dir/sweep-<file name>

    def run_sweep(*args: str) -> tuple[int, str, str]:
        code = main(["sweep", "run", str(path), "--launch-args", ONE_PROCESS, *args])
        out, err = capfd.readouterr()
        return code, out, err

    code, out, err = run_sweep("--trial", "1")  # as one SLURM array task would
    assert code == 0, err[-3000:]
    assert not (directory / "trial-000").exists() and (directory / "trial-001" / "summary.json").is_file()
    assert [(r["trial"], r["status"]) for r in read_table(directory / "trials.csv")] == [
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
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["hidden"] == hidden
        losses[name] = json.loads((run_dir / "summary.json").read_text())["best_val_loss"]
    table = read_table(directory / "trials.csv")
    assert [r["trial"] for r in table] == sorted(losses, key=losses.get)  # ranked by best validation loss
    assert [r["rank"] for r in table] == ["1", "2"] and {r["status"] for r in table} == {"finished"}
    for row in table:
        assert math.isclose(float(row["best_val_loss"]), losses[row["trial"]], rel_tol=1e-12)
        assert row["model.hidden"] == str(8 if row["trial"] == "trial-000" else 16)
    assert "best_val_loss" in out and f"table: {directory / 'trials.csv'}" in out

    code, out, _ = run_sweep()
    assert code == 0 and out.count("finished earlier, skipped") == 2 and "accelerate.commands.launch" not in out

    grid(path, data, tmp_path / "runs", **{"model.hidden": {"values": [8, 32]}})  # edited in place
    code, _, err = run_sweep()
    assert code == 2 and "its trials differ from those in" in err
    assert read_table(directory / "trials.csv") == table  # nothing lost


def test_wandb_sweep_config_keeps_wandb_keys_and_runs_each_trial_through_the_cli(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 1\n")
    path = write_sweep(
        tmp_path / "s.yaml",
        method="bayes",
        config="base.yaml",
        overrides=["data.root=/data/cp-anemic", "tracking.project=anemia-sweeps"],
        metric={"name": "val_auroc", "goal": "maximize"},
        run_cap=8,
        parameters={"optim.lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-3}},
    )
    config = sweep.wandb_config(sweep.load_sweep(path))
    assert config["metric"] == {"name": "val_auroc", "goal": "maximize"} and config["run_cap"] == 8
    assert "config" not in config and "overrides" not in config
    assert config["command"] == [
        "${env}", "${interpreter}", "-m", "${program}", "sweep", "trial", "--config", str(tmp_path / "base.yaml"),
        "data.root=/data/cp-anemic", "tracking.project=anemia-sweeps", "${args_no_hyphens}",
    ]  # fmt: skip
    assert config["program"] == "anemia_dist"
    default = sweep.wandb_config(
        sweep.load_sweep(write_sweep(tmp_path / "d.yaml", method="grid", parameters={"optim.lr": {"values": [1e-4]}}))
    )
    assert default["metric"] == {"name": "best_val_loss", "goal": "minimize"}


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
    path = grid(tmp_path / "lr.yaml", data, tmp_path / "runs", **{"optim.lr": {"values": [1.0e-3, 3.0e-4]}})
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


@pytest.mark.multiprocess
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
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == 3e-4
    assert json.loads((run_dir / "summary.json").read_text())["epochs_run"] == 1
    (offline,) = (root / "wandb").glob("offline-run-*-trial7")
    records = read_records(next(offline.glob("run-*.wandb")))
    assert run_id(records) == "trial7"  # the agent's run: W&B files the result under the sweep
    assert wandb_config_of(records)["optim.lr"] == 3e-4  # the parameter file the agent wrote
    assert [row["epoch"] for row in history(records)] == [1]


def test_sweep_trial_outside_an_agent_says_what_starts_it(monkeypatch, capsys):
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    assert main(["sweep", "trial", "optim.lr=1e-3"]) == 2
    assert "trials are started by a W&B agent" in capsys.readouterr().err


def test_sweep_init_creates_the_sweep_in_the_base_configs_project_and_prints_the_agent_line(
    tmp_path, monkeypatch, capsys
):
    import wandb

    created = []
    monkeypatch.setattr(
        wandb, "sweep", lambda config, project, entity: created.append((config, project, entity)) or "abc123"
    )
    path = write_sweep(
        tmp_path / "s.yaml",
        method="grid",
        overrides=["tracking.project=anemia-sweeps", "tracking.entity=lab"],
        parameters={"optim.lr": {"values": [1e-4]}},
    )
    assert main(["sweep", "init", str(path)]) == 0
    ((config, project, entity),) = created  # the server's own checks are not run here
    assert (project, entity) == ("anemia-sweeps", "lab") and config == sweep.wandb_config(sweep.load_sweep(path))
    assert "slurm/sweep_agent.sbatch lab/anemia-sweeps/abc123" in capsys.readouterr().out
