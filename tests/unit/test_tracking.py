"""W&B tracking settings, the init arguments that continue a run, and the reachability check.
(Real runs, online fallback and offline files: ``tests/multiprocess/test_tracking_runs.py``.)"""

from __future__ import annotations

import re
import socket

import pytest

from anemia_dist import tracking
from anemia_dist.config import load_config
from anemia_dist.errors import ConfigError


def test_tracking_settings_accept_yaml_off_and_name_the_key_on_bad_values():
    assert load_config(None, ["tracking.wandb=off"]).tracking.wandb == "off"  # YAML reads off as false
    cfg = load_config(None, ["tracking.wandb=offline", "tracking.tags=[fold0, resnet50]", "tracking.entity=lab"])
    assert (cfg.tracking.wandb, cfg.tracking.tags, cfg.tracking.entity) == ("offline", ["fold0", "resnet50"], "lab")
    for override, key in [
        ("tracking.wandb=on", "tracking.wandb"),
        ("tracking.wandb=cloud", "tracking.wandb"),
        ("tracking.project=team/anemia", "tracking.project"),
        ("tracking.tags=['']", "tracking.tags[0]"),
    ]:
        with pytest.raises(ConfigError, match=f"^{re.escape(key)}: "):
            load_config(None, [override])


def test_init_kwargs_continue_the_saved_run_and_respect_wandb_environment(monkeypatch):
    cfg = load_config(
        None, ["tracking.wandb=online", "run.output_dir=/scratch/runs", "run.name=fold0", "tracking.tags=[a]"]
    )
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    fresh = tracking.wandb_init_kwargs(cfg, None, "online")["wandb"]
    assert fresh["id"] is None and fresh["resume"] is None
    assert (fresh["name"], fresh["tags"], fresh["dir"]) == ("fold0", ["a"], "/scratch/runs/fold0")
    resumed = tracking.wandb_init_kwargs(cfg, "abc123", "online")["wandb"]
    assert resumed["id"] == "abc123" and resumed["resume"] == "allow"
    assert tracking.wandb_mode(cfg.tracking) == "online"

    monkeypatch.setenv("WANDB_MODE", "offline")  # a compute node's setting wins over the config
    monkeypatch.setenv("WANDB_DIR", "/scratch/wandb")
    assert tracking.wandb_mode(cfg.tracking) == "offline"
    assert "dir" not in tracking.wandb_init_kwargs(cfg, None, "offline")["wandb"]
    assert tracking.log_with(load_config(None, []).tracking) is None


def test_unreachable_server_is_named_within_seconds():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert tracking.unreachable(f"http://127.0.0.1:{port}") is None
    problem = tracking.unreachable(f"http://127.0.0.1:{port}")
    assert problem is not None and f"http://127.0.0.1:{port}" in problem
