"""Real 2-rank CPU runs (gloo): the distributed decisions equal the one-process ones."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
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


def spy_run(tmp_path: Path, data: Path, *flags: str, extra: tuple[str, ...] = ()) -> list[dict]:
    out = tmp_path / "spy"
    out.mkdir()
    overrides = [
        *TINY,
        f"data.root={data}",
        f"run.output_dir={tmp_path / 'runs'}",
        "run.name=spy",
        "unfreeze.head_only_epochs=1",
        "optim.lr=1e-2",
        "early_stopping.patience=2",
        "train.epochs=8",
        *extra,
    ]
    check(launch([script("rank_spy.py"), str(out), *flags, "--", *overrides]))
    return read_ranks(out, 2)


@pytest.mark.parametrize("precision", ["no", "fp16", "bf16"])
def test_two_ranks_agree_on_every_decision_and_only_rank0_writes(tmp_path, precision):
    data = make_image_folder(tmp_path / "data", {"anemic": 12, "non-anemic": 16})
    shorter = () if precision == "no" else (f"train.mixed_precision={precision}", "train.epochs=3")
    rank0, rank1 = spy_run(tmp_path, data, extra=shorter)

    # layer4 trains from epoch 2 on different data per rank, yet stays bit-identical
    hashes0 = [e["layer4"] for e in rank0["epochs"]]
    assert hashes0 == [e["layer4"] for e in rank1["epochs"]]
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
    assert rank0["epochs"][0]["layer4"] == rank1["epochs"][0]["layer4"]
    assert rank0["epochs"][1]["layer4"] != rank1["epochs"][1]["layer4"]


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
