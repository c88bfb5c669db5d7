"""Sweep files: every check names the file and key before any trial, the local grid's and random
search's trials, the W&B sweep config (its keys, metric and trial command), and ``sweep init`` and
``sweep trial`` without a server (in process). Trials that really train:
``tests/multiprocess/test_sweep_runs.py``."""

from __future__ import annotations

import pytest
from helpers import write_sweep

from anemia_dist import sweep
from anemia_dist.cli import main
from anemia_dist.errors import ConfigError


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
