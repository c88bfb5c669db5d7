"""End-to-end runs through the CLI: the run directory, early unfreezing on two ranks, the demo,
real data, bf16. (Errors before any work: ``tests/unit/test_cli.py``.)"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from helpers import TINY, check, launch, run_cli

from anemia_dist.inference import load_best
from anemia_dist.run_dir import BEST, CONFIG, SPLITS, SUMMARY, read_metrics

pytestmark = pytest.mark.multiprocess

ROW_KEYS = {
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "lr",
    "unfrozen",
    "world_size",
    "epoch_seconds",
    "train_images",
    "train_images_per_second",
}


def test_one_process_run_writes_the_documented_run_directory(tmp_path, image_folder):
    check(
        run_cli(
            "train",
            *TINY,
            f"data.root={image_folder}",
            f"run.output_dir={tmp_path}",
            "run.name=r",
            "train.epochs=3",
            "unfreeze.head_only_epochs=1",
        )
    )
    run = tmp_path / "r"
    assert {"config.yaml", "splits.csv", "metrics.jsonl", "summary.json", "curves.png", "best"} <= {
        p.name for p in run.iterdir()
    }
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(ROW_KEYS <= set(r) for r in rows)
    assert [r["unfrozen"] for r in rows] == [[], ["layer4"], ["layer4"]]
    assert all(len(r["lr"]) == 2 and r["world_size"] == 1 for r in rows)

    with (run / SPLITS).open() as handle:
        splits = list(csv.DictReader(handle))
    assert len(splits) == 24 and {r["split"] for r in splits} == {"train", "val"}

    summary = json.loads((run / SUMMARY).read_text())
    assert summary["epochs_run"] == 3 and summary["stop_reason"] == "max_epochs"
    best = min(rows, key=lambda r: r["val_loss"])
    assert summary["best_epoch"] == best["epoch"] and summary["best_val_loss"] == best["val_loss"]

    model, meta = load_best(run / BEST)
    assert meta["classes"] == ["anemic", "non-anemic"] and meta["epoch"] == best["epoch"]
    assert meta["arch"] == "resnet18" and meta["image_size"] == 32 and "normalization" in meta
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)
    assert "train:\n  epochs: 3" in (run / CONFIG).read_text()


def test_plateaued_head_unfreezes_early_on_both_ranks(tmp_path, image_folder):
    check(
        launch(
            [
                "-m",
                "anemia_dist",
                "train",
                *TINY,
                f"data.root={image_folder}",
                f"run.output_dir={tmp_path}",
                "run.name=p",
                "optim.lr=1e-7",
                "early_stopping.min_delta=1e-4",
                "unfreeze.head_only_epochs=100",
                "unfreeze.plateau_patience=2",
                "train.epochs=4",
            ]
        )
    )
    rows = read_metrics(tmp_path / "p")
    # epoch 1 sets the best; epochs 2 and 3 do not improve; layer4 trains from epoch 4
    assert [r["unfrozen"] for r in rows] == [[], [], [], ["layer4"]]


def test_demo_runs_on_two_cpu_ranks_and_prints_a_summary(tmp_path):
    result = check(run_cli("demo", "--output-dir", str(tmp_path), "train.epochs=2"))
    assert "demo finished" in result.stdout
    summary = json.loads((tmp_path / "demo" / SUMMARY).read_text())
    assert summary["world_size"] == 2 and summary["epochs_run"] == 2
    with (tmp_path / "demo-data" / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    anemic = sum(r["label"] == "anemic" for r in rows) / len(rows)
    assert 0.2 < anemic < 0.45, "about one anemic image in three"


def test_trains_on_real_cp_anemic_folders(tmp_path, cp_anemic):
    check(
        run_cli(
            "train",
            *TINY,
            f"data.root={cp_anemic}",
            f"run.output_dir={tmp_path}",
            "run.name=cp",
            "train.epochs=2",
            "train.batch_size=32",
            "data.classes=[Anemic, Non-anemic]",
        )
    )
    rows = read_metrics(tmp_path / "cp")
    assert len(rows) == 2 and all(r["val_loss"] > 0 for r in rows)
    with (tmp_path / "cp" / SPLITS).open() as handle:
        assert sum(1 for _ in csv.DictReader(handle)) == 615


def test_bf16_mixed_precision_from_the_config_trains_on_cpu(tmp_path, image_folder):
    result = check(
        run_cli(
            "train",
            *TINY,
            f"data.root={image_folder}",
            f"run.output_dir={tmp_path}",
            "run.name=bf",
            "train.epochs=1",
            "train.mixed_precision=bf16",
        )
    )
    rows = read_metrics(tmp_path / "bf")
    assert len(rows) == 1 and rows[0]["val_loss"] > 0
    assert "mixed precision bf16" in result.stdout
