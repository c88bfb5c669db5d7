"""Real 2-rank CPU runs (gloo): the distributed decisions equal the one-process ones."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from accelerate import Accelerator
from helpers import ROOT, TINY, check, fake_checkpoint, free_port, launch, make_image_folder, read_csv, script

from anemia_dist.checkpointing import Checkpointer
from anemia_dist.cli import launch_command
from anemia_dist.config import load_config
from anemia_dist.run_dir import CHECKPOINTS, METRICS, SPLITS, WEIGHTS, read_metrics

pytestmark = pytest.mark.multiprocess


def read_ranks(out: Path, world: int) -> list[dict]:
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world)]


def probe_validation(root: Path, overrides: list[str], world: int) -> float:
    """val_loss_probe.py on ``world`` ranks: every rank's loss, after checking they agree."""
    out = root / f"world{world}"
    out.mkdir()
    check(launch([script("val_loss_probe.py"), str(out), "--", *overrides], num_processes=world))
    ranks = read_ranks(out, world)
    assert all(r["n"] == 13 for r in ranks), "every validation image counted exactly once"
    assert len({r["val_loss"] for r in ranks}) == 1, "identical on every rank"
    return ranks[0]["val_loss"]


@pytest.fixture(scope="module")
def validation_one_process(tmp_path_factory):
    # 13 validation images, batch 4: 16, 24 and 16 slots on 2, 3 and 4 ranks, the rest padding.
    root = tmp_path_factory.mktemp("validation")
    train = make_image_folder(root / "train", {"anemic": 6, "non-anemic": 9})
    val = make_image_folder(root / "val", {"anemic": 5, "non-anemic": 8})
    overrides = [*TINY, f"data.root={train}", f"data.val_root={val}", "model.dropout=0.0"]
    return overrides, probe_validation(root, overrides, 1)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_validation_loss_on_n_ranks_equals_one_process(tmp_path, validation_one_process, world):
    overrides, single = validation_one_process
    assert probe_validation(tmp_path, overrides, world) == pytest.approx(single, rel=1e-6)


FLAT = [
    "optim.lr=1e-7",
    "scheduler.min_lr=0",
    "early_stopping.min_delta=1e-4",
    "unfreeze.head_only_epochs=100",
    "unfreeze.plateau_patience=4",
    "train.epochs=7",
]
"""lr 1e-7: a flat validation loss (it moves < 1e-5 an epoch), so the plateau decides: the lr is
cut after epoch 5 (patience 3), layer4 unfreezes at epoch 6 (4 epochs without improvement), and
early stopping (patience 5) stops after epoch 6, epoch 1 staying the best: every decision the
synced loss drives, taken within seven epochs."""


def decisions(report: dict) -> dict:
    """What the synced validation loss decides, as one rank saw it."""
    summary = report["summary"]
    rows = report["rows"]
    return {
        "lr": [row["lr"] for row in rows],
        "unfrozen": [row["unfrozen"] for row in rows],
        **{key: summary[key] for key in ("best_epoch", "epochs_run", "stop_reason")},
    }


@pytest.fixture(scope="module")
def flat_one_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("flat")
    data = make_image_folder(root / "data", {"anemic": 10, "non-anemic": 13})
    (single,) = spy_run(root, data, world=1, extra=tuple(FLAT), defaults=False)
    return data, decisions(single)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_plateau_unfreeze_stop_and_best_decisions_on_n_ranks_equal_one_process(tmp_path, flat_one_process, world):
    data, single = flat_one_process
    lrs = [lr[0] for lr in single["lr"]]
    assert lrs[:5] == [1e-7] * 5 and lrs[5] == pytest.approx(0.5e-7), lrs
    assert single["unfrozen"][4:] == [[], ["layer4"]] and single["epochs_run"] == 6, single
    assert single["best_epoch"] == 1 and single["stop_reason"] == "early_stopping", single
    ranks = spy_run(tmp_path, data, world=world, extra=tuple(FLAT), defaults=False)
    assert [decisions(report) for report in ranks] == [single] * world


def spy_run(
    tmp_path: Path, data: Path, *flags: str, extra: tuple[str, ...] = (), world: int = 2, defaults: bool = True
) -> list[dict]:
    """rank_spy.py's reports, one per rank; ``defaults``: a run that unfreezes at epoch 2 and stops early."""
    out = tmp_path / "spy"
    out.mkdir()
    overrides = [*TINY, f"data.root={data}", f"run.output_dir={tmp_path / 'runs'}", "run.name=spy"]
    if defaults:
        overrides += ["unfreeze.head_only_epochs=1", "optim.lr=1e-2", "early_stopping.patience=2", "train.epochs=8"]
    check(launch([script("rank_spy.py"), str(out), *flags, "--", *overrides, *extra], num_processes=world))
    return read_ranks(out, world)


@pytest.mark.parametrize("precision", ["no", "fp16", "bf16"])
def test_two_ranks_agree_on_every_decision_and_only_rank0_writes(tmp_path, precision):
    data = make_image_folder(tmp_path / "data", {"anemic": 12, "non-anemic": 16})
    shorter = () if precision == "no" else (f"train.mixed_precision={precision}", "train.epochs=3")
    rank0, rank1 = spy_run(tmp_path, data, extra=shorter)

    # layer4 trains from epoch 2 on different data per rank, yet stays bit-identical
    hashes0 = [e["last_stage"] for e in rank0["epochs"]]
    assert hashes0 == [e["last_stage"] for e in rank1["epochs"]]
    assert len(set(hashes0[1:])) == len(hashes0) - 1, "layer4 changed every epoch after unfreezing"
    assert hashes0[0] != hashes0[1]

    # the same global validation loss on both ranks, so the same stop
    assert [e["val_loss"] for e in rank0["epochs"]] == [e["val_loss"] for e in rank1["epochs"]]
    assert rank0["summary"] == rank1["summary"]
    metrics = read_metrics(tmp_path / "runs" / "spy")
    assert len(metrics) == rank0["summary"]["epochs_run"] == len(rank0["epochs"])

    # Accelerate's save_state has every rank write its own RNG state into the checkpoint being
    # assembled; apart from that, rank 1 writes nothing.
    own_rng_state = re.compile(r".*/checkpoints/\.tmp-epoch-\d+(/random_states_1\.pkl)?$")
    assert [w for w in rank1["writes"] if not own_rng_state.match(w.split(":", 1)[1])] == []
    last = tmp_path / "runs" / "spy" / CHECKPOINTS / f"epoch-{rank0['summary']['epochs_run']:04d}"
    assert (last / "random_states_1.pkl").is_file() and (last / WEIGHTS).is_file()
    assert (last / "scaler.pt").is_file() == (precision == "fp16"), "fp16 saves the scaler, once"
    assert any("metrics.jsonl" in w for w in rank0["writes"])


def test_spy_detects_layer4_drift_without_rewrapping_ddp(tmp_path):
    """Negative control: if DDP were not rebuilt after unfreezing, the ranks would drift apart."""
    data = make_image_folder(tmp_path / "data", {"anemic": 12, "non-anemic": 16})
    rank0, rank1 = spy_run(tmp_path, data, "--no-rewrap")
    assert rank0["epochs"][0]["last_stage"] == rank1["epochs"][0]["last_stage"]
    assert rank0["epochs"][1]["last_stage"] != rank1["epochs"][1]["last_stage"]


def test_a_timm_backbone_unfreezes_its_last_stage_in_step_on_two_ranks(tmp_path):
    """ConvNeXt's last stage (and its final norm) is all-reduced after the unfreeze, as ResNet's layer4;
    with class-balanced sampling instead of class weights (one run for both: each launch costs)."""
    data = make_image_folder(tmp_path / "data", {"anemic": 6, "non-anemic": 14})
    arch = ("model.arch=timm:convnext_atto", "train.epochs=3", "early_stopping.patience=5")
    sampling = ("train.sampler=balanced", "train.class_weights=none")
    rank0, rank1 = spy_run(tmp_path, data, extra=arch + sampling)
    hashes = [e["last_stage"] for e in rank0["epochs"]]
    assert hashes == [e["last_stage"] for e in rank1["epochs"]]
    assert len(set(hashes)) == 3, "frozen in epoch 1, trained in epochs 2 and 3"
    assert read_metrics(tmp_path / "runs" / "spy")[-1]["unfrozen"] == ["stages.3"]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_training_image_counts_once_per_epoch_on_n_ranks(tmp_path, world):
    # 15 training images, batch 4: 16, 24 and 16 slots per epoch on 2, 3 and 4 ranks; on 3 ranks
    # two ranks get a last batch of padding only. The padding trains nothing and counts nowhere.
    train = make_image_folder(tmp_path / "train", {"anemic": 7, "non-anemic": 8})
    val = make_image_folder(tmp_path / "val", {"anemic": 3, "non-anemic": 4})
    runs = tmp_path / "runs"
    overrides = [*TINY, f"data.root={train}", f"data.val_root={val}", f"run.output_dir={runs}", "run.name=n"]
    check(launch(["-m", "anemia_dist", "train", *overrides, "train.epochs=2"], num_processes=world))
    trained = [row for row in read_csv(runs / "n" / SPLITS) if row["split"] == "train"]
    assert len(trained) == 15
    rows = read_metrics(runs / "n")
    assert [row["train_images"] for row in rows] == [15, 15]
    assert all(row["world_size"] == world for row in rows)


def test_a_launcher_dynamo_backend_is_refused_before_training_pointing_to_train_compile(tmp_path, image_folder):
    # Accelerate would wrap DDP in a compiled module, and the rebuild at unfreezing would miss it.
    overrides = [*TINY, f"data.root={image_folder}", f"run.output_dir={tmp_path}", "run.name=d"]
    command = launch_command(2, ["-m", "anemia_dist", "train", *overrides], port=free_port())
    command[command.index("--dynamo_backend") + 1] = "eager"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "--dynamo_backend eager: not supported" in result.stderr and "train.compile=true" in result.stderr
    assert not (tmp_path / "d").exists(), "refused before anything was written"


def test_every_rank_follows_the_main_process_resume_decisions_despite_a_stale_listing(tmp_path):
    classes = ["anemic", "non-anemic"]
    cfg = load_config(None, [*TINY, f"run.output_dir={tmp_path / 'runs'}", "run.name=r", "run.resume=auto"])
    identity = Checkpointer(Accelerator(), tmp_path, cfg, classes).identity
    checkpoints = tmp_path / "runs" / "r" / CHECKPOINTS
    fake_checkpoint(checkpoints / "epoch-0001", identity, 1, unfrozen=False)
    newest = fake_checkpoint(checkpoints / "epoch-0002", identity, 2, unfrozen=True)
    (tmp_path / "runs" / "r" / METRICS).write_text('{"epoch": 1}\n{"epoch": 2}\n')
    out = tmp_path / "out"
    out.mkdir()
    overrides = [f"run.output_dir={tmp_path / 'runs'}", "run.name=r", "run.resume=auto", *TINY]
    check(launch([script("stale_listing.py"), str(out), ",".join(classes), "--", *overrides]))
    rank0, rank1 = read_ranks(out, 2)
    assert rank0 == {"resume": str(newest), "unfrozen": True, "refused": True}
    assert rank1 == rank0, "rank 1's own view (no checkpoints, no metrics, not unfrozen) is not used"
