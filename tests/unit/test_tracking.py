"""Tracking settings, the init arguments that continue a run, where MLflow and TensorBoard write,
the flat config they get, the reachability check, and TensorBoard's purge on resume (in process).
(Real runs, online fallback, offline files, a real MLflow server: ``tests/multiprocess/test_tracking_runs.py``.)"""

from __future__ import annotations

import re
import socket

import pytest
from accelerate import Accelerator
from helpers import tensorboard_scalars

from anemia_dist import tracking
from anemia_dist.config import load_config
from anemia_dist.errors import ConfigError
from anemia_dist.progress import TrainingProgress
from anemia_dist.run_dir import MLFLOW_STORE, TENSORBOARD_EVENTS


def test_tracking_settings_accept_yaml_off_and_name_the_key_on_bad_values():
    assert load_config(None, ["tracking.wandb=off"]).tracking.wandb == "off"  # YAML reads off as false
    cfg = load_config(None, ["tracking.wandb=offline", "tracking.tags=[fold0, resnet50]", "tracking.entity=lab"])
    assert (cfg.tracking.wandb, cfg.tracking.tags, cfg.tracking.entity) == ("offline", ["fold0", "resnet50"], "lab")
    for override, key in [
        ("tracking.wandb=on", "tracking.wandb"),
        ("tracking.wandb=cloud", "tracking.wandb"),
        ("tracking.project=team/anemia", "tracking.project"),
        ("tracking.tags=['']", "tracking.tags[0]"),
        ("tracking.log_with=[mlflow, comet_ml]", "tracking.log_with[1]"),
        ("tracking.log_with=[mlflow, mlflow]", "tracking.log_with"),
    ]:
        with pytest.raises(ConfigError, match=f"^{re.escape(key)}: "):
            load_config(None, [override])


def test_init_kwargs_continue_the_saved_run_and_respect_wandb_environment(monkeypatch):
    cfg = load_config(
        None, ["tracking.wandb=online", "run.output_dir=/scratch/runs", "run.name=fold0", "tracking.tags=[a]"]
    )
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    fresh = tracking.wandb_init_kwargs(cfg, None, "online")
    assert fresh["id"] is None and fresh["resume"] is None
    assert (fresh["name"], fresh["tags"], fresh["dir"]) == ("fold0", ["a"], "/scratch/runs/fold0")
    resumed = tracking.wandb_init_kwargs(cfg, "abc123", "online")
    assert resumed["id"] == "abc123" and resumed["resume"] == "allow"
    assert tracking.wandb_mode(cfg.tracking) == "online"

    monkeypatch.setenv("WANDB_MODE", "offline")  # a compute node's setting wins over the config
    monkeypatch.setenv("WANDB_DIR", "/scratch/wandb")
    assert tracking.wandb_mode(cfg.tracking) == "offline"
    assert "dir" not in tracking.wandb_init_kwargs(cfg, None, "offline")


def test_tracker_list_adds_wandb_for_its_mode_and_puts_it_first(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    names = [tracking.tracker_names(load_config(None, o).tracking) for o in ([], ["tracking.wandb=offline"])]
    assert names == [[], ["wandb"]]
    listed = load_config(None, ["tracking.log_with=[tensorboard, mlflow, wandb]"]).tracking
    assert tracking.tracker_names(listed) == ["wandb", "mlflow", "tensorboard"]
    assert tracking.wandb_mode(listed) == "online"  # listed with tracking.wandb=off (the default)
    both = load_config(None, ["tracking.log_with=[tensorboard]", "tracking.wandb=offline"]).tracking
    assert tracking.tracker_names(both) == ["wandb", "tensorboard"] and tracking.wandb_mode(both) == "offline"


def test_mlflow_store_and_tensorboard_folder_default_beside_the_runs(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=fold0"])
    assert tracking.mlflow_uri(cfg) == (f"sqlite:///{tmp_path}/{MLFLOW_STORE}", "run.output_dir")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.hospital:5000")
    assert tracking.mlflow_uri(cfg) == ("http://mlflow.hospital:5000", "MLFLOW_TRACKING_URI")
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=fold0", "tracking.mlflow_uri=http://h:1"])
    assert tracking.mlflow_uri(cfg) == ("http://h:1", "tracking.mlflow_uri")  # the config wins over the environment
    assert tracking.tensorboard_location(cfg) == (f"{tmp_path}/fold0", TENSORBOARD_EVENTS)
    cfg.tracking.tensorboard_dir = "/shared/tb"
    assert tracking.tensorboard_location(cfg) == ("/shared/tb", "fold0")


def test_flat_config_reads_back_as_overrides_into_the_same_config():
    cfg = load_config("demo", ["unfreeze.layers=[layer3, layer4]", "data.threshold_rules=[]", "tracking.tags=[a]"])
    flat = tracking.flat_config(cfg.to_dict())
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())  # what MLflow and TensorBoard take
    assert flat["unfreeze.layers"] == '["layer3", "layer4"]' and flat["run.name"] == "null"
    assert load_config(None, [f"{key}={value}" for key, value in flat.items()]) == cfg
    assert load_config(None, []) != cfg  # the round trip above is not trivially true


def test_mlflow_server_that_cannot_be_reached_is_named_before_training(tmp_path):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        address = f"http://127.0.0.1:{closed.getsockname()[1]}"
    cfg = load_config(
        None,
        ["tracking.log_with=[mlflow]", f"tracking.mlflow_uri={address}", f"run.output_dir={tmp_path}", "run.name=r"],
    )
    with pytest.raises(ConfigError, match=f"^tracking.mlflow_uri: MLflow server cannot reach {re.escape(address)}"):
        tracking.start(Accelerator(), cfg, TrainingProgress())


def test_tensorboard_resume_replaces_the_epochs_it_logs_again(tmp_path):
    """A run killed after logging epoch 3 but before checkpointing it resumes from epoch 2: the
    reader shows the new epoch 3, once."""
    cfg = load_config(None, ["tracking.log_with=[tensorboard]", f"run.output_dir={tmp_path}", "run.name=r"])
    accelerator, progress = Accelerator(), TrainingProgress()
    for resumed_after, epochs in ((0, (1, 2, 3)), (2, (3, 4))):
        progress.epoch = resumed_after
        tracking.start(accelerator, cfg, progress)
        for epoch in epochs:
            accelerator.log({"val_loss": epoch + resumed_after / 10}, step=epoch)
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.trackers.clear()
    logged = tensorboard_scalars(tmp_path / "r" / TENSORBOARD_EVENTS, "val_loss")
    assert logged == [(1, 1.0), (2, 2.0), (3, pytest.approx(3.2)), (4, pytest.approx(4.2))]


def test_unreachable_server_is_named_within_seconds():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert tracking.unreachable(f"http://127.0.0.1:{port}") is None
    problem = tracking.unreachable(f"http://127.0.0.1:{port}")
    assert problem is not None and f"http://127.0.0.1:{port}" in problem
