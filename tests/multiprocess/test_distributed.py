"""Real 2-rank CPU runs (gloo): the distributed decisions equal the one-process ones."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, TINY, check, launch, make_image_folder, script

from anemia_dist.run_dir import CHECKPOINTS, WEIGHTS, read_metrics

pytestmark = pytest.mark.multiprocess


def read_ranks(out: Path, world: int) -> list[dict]:
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world)]


def test_validation_loss_on_two_ranks_equals_one_process(tmp_path):
    # 13 validation images, batch 4, 2 ranks: the sampler pads the last batch with duplicates.
    train = make_image_folder(tmp_path / "train", {"anemic": 6, "non-anemic": 9})
    val = make_image_folder(tmp_path / "val", {"anemic": 5, "non-anemic": 8})
    overrides = [*TINY, f"data.root={train}", f"data.val_root={val}", "model.dropout=0.0"]
    values = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}"
        out.mkdir()
        check(launch([script("val_loss_probe.py"), str(out), "--", *overrides], num_processes=world))
        ranks = read_ranks(out, world)
        assert all(r["n"] == 13 for r in ranks), "every validation image counted exactly once"
        assert len({r["val_loss"] for r in ranks}) == 1, "identical on every rank"
        values[world] = ranks[0]["val_loss"]
    assert values[2] == pytest.approx(values[1], rel=1e-6)


def flat_loss_run(tmp_path: Path, data: Path, world: int) -> list[dict]:
    """lr 1e-7 and no unfreezing (layer4's BatchNorm statistics would move): a flat validation loss."""
    run = [
        *TINY,
        f"data.root={data}",
        f"run.output_dir={tmp_path / f'runs{world}'}",
        "run.name=flat",
        "optim.lr=1e-7",
        "scheduler.min_lr=0",
        "early_stopping.min_delta=1e-4",
        "unfreeze.head_only_epochs=100",
        "train.epochs=12",
    ]
    if world == 1:
        check(
            subprocess.run(
                [sys.executable, "-m", "anemia_dist", "train", *run], capture_output=True, text=True, cwd=ROOT
            )
        )
    else:
        check(launch(["-m", "anemia_dist", "train", *run], num_processes=world))
    return read_metrics(tmp_path / f"runs{world}" / "flat")


def test_plateau_cuts_lr_after_patience_plus_one_flat_epochs_on_two_ranks_as_on_one(tmp_path, image_folder):
    rows = {world: flat_loss_run(tmp_path, image_folder, world) for world in (1, 2)}
    for world, metrics in rows.items():
        lrs = [row["lr"][0] for row in metrics]
        # patience 3: epoch 1 sets the best, epochs 2-5 do not improve, the cut follows epoch 5.
        assert lrs[:5] == [1e-7] * 5, (world, lrs)
        assert lrs[5] == pytest.approx(0.5e-7), (world, lrs)
        # early stopping (patience 5) ends the run after epoch 6 on every world size
        assert len(metrics) == 6, (world, len(metrics))
    assert [r["lr"] for r in rows[1]] == [r["lr"] for r in rows[2]]
    assert rows[2][0]["world_size"] == 2


def spy_run(tmp_path: Path, data: Path, *flags: str, overrides: tuple[str, ...] = ()) -> list[dict]:
    out = tmp_path / "spy"
    out.mkdir()
    base = [
        *TINY,
        f"data.root={data}",
        f"run.output_dir={tmp_path / 'runs'}",
        "run.name=spy",
        "unfreeze.head_only_epochs=1",
        "optim.lr=1e-2",
        "early_stopping.patience=2",
        "train.epochs=8",
    ]
    check(launch([script("rank_spy.py"), str(out), *flags, "--", *base, *overrides]))
    return read_ranks(out, 2)


def test_two_ranks_agree_on_every_decision_and_only_rank0_writes(tmp_path):
    data = make_image_folder(tmp_path / "data", {"anemic": 12, "non-anemic": 16})
    rank0, rank1 = spy_run(tmp_path, data)

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
    rank0, rank1 = spy_run(tmp_path, data, overrides=arch + sampling)
    hashes = [e["last_stage"] for e in rank0["epochs"]]
    assert hashes == [e["last_stage"] for e in rank1["epochs"]]
    assert len(set(hashes)) == 3, "frozen in epoch 1, trained in epochs 2 and 3"
    assert read_metrics(tmp_path / "runs" / "spy")[-1]["unfrozen"] == ["stages.3"]
