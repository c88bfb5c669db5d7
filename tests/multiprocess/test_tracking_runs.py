"""W&B in real runs: the offline fallback of a one-process run, and what a real 2-rank offline
run writes, read back from its ``.wandb`` file with wandb's own protobuf records."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from helpers import ROOT, TINY, check, launch, make_image_folder
from wandb_records import config, history, read_records, run_id, summary

from anemia_dist.run_dir import CHECKPOINT_INFO, CHECKPOINTS, CONFIG, SUMMARY, read_metrics

pytestmark = pytest.mark.multiprocess

FALLBACK = "W&B online logging unavailable"


@pytest.fixture
def listening_server():
    """A TCP port that accepts connections (the kernel completes them) and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def test_online_without_an_api_key_trains_on_and_logs_offline_with_a_message(tmp_path, listening_server):
    data = make_image_folder(tmp_path / "data", {"anemic": 8, "non-anemic": 8})
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    # No key anywhere: a fresh HOME has no ~/.netrc or W&B settings.
    env |= {
        "HOME": str(tmp_path / "home"),
        "WANDB_BASE_URL": listening_server,
        "WANDB_DIR": str(tmp_path),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "anemia_dist",
            "train",
            *TINY,
            f"data.root={data}",
            "train.epochs=1",
            f"run.output_dir={tmp_path / 'runs'}",
            "run.name=r",
            "tracking.wandb=online",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    check(result)
    assert FALLBACK in result.stderr and "No API key" in result.stderr and "wandb sync" in result.stderr
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    logged = history(read_records(next(offline.glob("run-*.wandb"))))
    assert [row["epoch"] for row in logged] == [1]


def wandb_runs(directory: Path) -> list[Path]:
    return sorted((directory / "wandb").glob("*run-*"), key=lambda p: p.name)


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """A real 2-rank run with WANDB_MODE=offline (as on a compute node) although the config says online."""
    root = tmp_path_factory.mktemp("tracking")
    data = make_image_folder(root / "data", {"anemic": 12, "non-anemic": 12})
    args = [
        "-m",
        "anemia_dist",
        "train",
        *TINY,
        f"data.root={data}",
        "unfreeze.head_only_epochs=1",
        "early_stopping.patience=50",
        f"run.output_dir={root / 'runs'}",
        "run.name=tracked",
        "tracking.wandb=online",
        "tracking.tags=[ci]",
    ]
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(root)}
    run_dir = root / "runs" / "tracked"
    first = check(launch([*args, "train.epochs=3"], env=env))
    first_runs, first_summary = wandb_runs(root), json.loads((run_dir / SUMMARY).read_text())
    first_config = yaml.safe_load((run_dir / CONFIG).read_text())
    check(launch([*args, "train.epochs=4", "run.resume=auto"], env=env))
    return SimpleNamespace(
        root=root,
        run_dir=run_dir,
        first=first,
        first_runs=first_runs,
        first_summary=first_summary,
        first_config=first_config,
    )


def values_equal(logged, expected) -> bool:
    if isinstance(logged, float) and math.isnan(logged):
        return math.isnan(expected)
    return logged == pytest.approx(expected, rel=1e-12)


def test_two_rank_offline_run_logs_exactly_what_metrics_jsonl_holds(offline_run):
    assert FALLBACK not in offline_run.first.stderr  # WANDB_MODE=offline: no attempt to go online
    runs = offline_run.first_runs
    assert len(runs) == 1 and runs[0].name.startswith("offline-run-"), runs
    records = read_records(next(runs[0].glob("run-*.wandb")))
    run_dir = offline_run.run_dir
    metrics = read_metrics(run_dir)[:3]

    logged = {row["_step"]: row for row in history(records)}
    assert sorted(logged) == [1, 2, 3]
    for row in metrics:
        entry = logged[row["epoch"]]
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert numbers, row
        for key, value in numbers.items():
            assert values_equal(entry[key], value), (row["epoch"], key, entry.get(key), value)
        for name, lr in zip(row["lr_groups"], row["lr"], strict=True):
            assert entry[f"lr/{name}"] == pytest.approx(lr, rel=1e-12)
    assert [logged[e]["trainable_stages"] for e in (1, 2, 3)] == [0, 1, 1]  # unfrozen at epoch 2

    logged_config = config(records)
    for section, values in offline_run.first_config.items():
        assert logged_config[section] == values, section

    outcome = summary(records)
    assert outcome["best_epoch"] == offline_run.first_summary["best_epoch"]
    assert outcome["best_val_loss"] == pytest.approx(offline_run.first_summary["best_val_loss"], rel=1e-12)
    assert outcome["stop_reason"] == "max_epochs" and outcome["unfreeze_epoch"] == 2


def test_resumed_run_continues_the_same_wandb_run_from_the_next_epoch(offline_run):
    root, first_runs = offline_run.root, offline_run.first_runs
    runs = wandb_runs(root)
    assert len(runs) == 2 and first_runs[0] in runs
    (second,) = [r for r in runs if r not in first_runs]
    first_records = read_records(next(first_runs[0].glob("run-*.wandb")))
    second_records = read_records(next(second.glob("run-*.wandb")))
    assert run_id(second_records) == run_id(first_records)
    checkpoints = sorted((root / "runs" / "tracked" / CHECKPOINTS).glob("epoch-*"))
    saved = json.loads((checkpoints[-1] / CHECKPOINT_INFO).read_text())["progress"]["tracker_run_id"]
    assert saved == run_id(first_records)
    assert [row["_step"] for row in history(second_records)] == [4]
    assert [row["epoch"] for row in read_metrics(root / "runs" / "tracked")] == [1, 2, 3, 4]
