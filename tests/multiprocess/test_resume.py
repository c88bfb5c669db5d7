"""Resume exactly: interrupted runs continue as if nothing happened (real trainings, 1 and 2 processes)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY, check, launch, make_image_folder, script, write_image

from anemia_dist.checkpointing import complete_checkpoints, read_info
from anemia_dist.preemption import PREEMPTED_EXIT_CODE
from anemia_dist.run_dir import CHECKPOINTS, METRICS, PREEMPTED, SUMMARY, WEIGHTS, read_metrics

pytestmark = pytest.mark.multiprocess

# A run that really trains (lr 1e-3), cuts the lr (patience 1) and unfreezes layer4 at epoch 3.
SETTINGS = [*TINY, "optim.lr=1e-3", "scheduler.patience=1", "unfreeze.head_only_epochs=2", "early_stopping.patience=3"]


def hard_folder(root: Path, per_class: int = 12) -> Path:
    """Both classes look alike: the validation loss wanders, so the lr is cut and training stops early."""
    for i in range(2 * per_class):
        write_image(root / ("anemic" if i % 2 else "non-anemic") / f"img_{i:03d}.png", (180, 90, 90), seed=i)
    return root


def train(data: Path, out: Path, name: str, world: int, *extra: str) -> subprocess.CompletedProcess:
    args = [*SETTINGS, f"data.root={data}", f"run.output_dir={out}", f"run.name={name}", *extra]
    if world == 1:
        command = [sys.executable, "-m", "anemia_dist", "train", *args]
        return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    return launch(["-m", "anemia_dist", "train", *args], num_processes=world)


def assert_same_rows(resumed: list[dict], reference: list[dict], from_epoch: int) -> None:
    assert [r["epoch"] for r in resumed] == [r["epoch"] for r in reference], "same stop epoch"
    for got, want in zip(resumed[from_epoch - 1 :], reference[from_epoch - 1 :], strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (got["epoch"], key)
        assert got["lr"] == want["lr"] and got["unfrozen"] == want["unfrozen"], got["epoch"]


@pytest.mark.parametrize(
    "world, k",
    [
        pytest.param(1, 1, id="one-process-interrupted-before-unfreezing"),
        pytest.param(2, 3, id="two-processes-interrupted-after-unfreezing"),
    ],
)
def test_resumed_run_reproduces_the_uninterrupted_run(tmp_path, world, k):
    data = hard_folder(tmp_path / "data")
    check(train(data, tmp_path, "whole", world, "train.epochs=9"))
    check(train(data, tmp_path, "parted", world, f"train.epochs={k}"))
    check(train(data, tmp_path, "parted", world, "train.epochs=9", "run.resume=auto"))
    reference, resumed = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "parted")
    assert any(r["lr"][0] < 1e-3 for r in reference), "the scenario includes an lr cut"
    assert len(reference) < 9, "and an early stop"
    assert_same_rows(resumed, reference, from_epoch=k + 1)
    assert (
        json.loads((tmp_path / "parted" / SUMMARY).read_text())["best_epoch"]
        == json.loads((tmp_path / "whole" / SUMMARY).read_text())["best_epoch"]
    )


def checkpoint_state(checkpoint: Path) -> dict:
    scheduler = torch.load(checkpoint / "scheduler.bin", weights_only=False)
    stopper = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)
    return {"scheduler_best": scheduler["best"], "scheduler_bad": scheduler["num_bad_epochs"], **stopper}


def test_two_process_run_resumes_on_one_process_with_its_scheduler_and_stopping_state(tmp_path):
    data = make_image_folder(tmp_path / "data", {"anemic": 10, "non-anemic": 14})
    check(train(data, tmp_path, "r", 2, "train.epochs=3"))
    saved = tmp_path / "r" / CHECKPOINTS / "epoch-0003"
    before = checkpoint_state(saved)
    result = check(train(data, tmp_path, "r", 1, "train.epochs=4", f"run.resume={saved}"))  # an explicit path
    assert "resumed from" in result.stdout
    rows = read_metrics(tmp_path / "r")
    assert [r["world_size"] for r in rows] == [2, 2, 2, 1]
    after = checkpoint_state(tmp_path / "r" / CHECKPOINTS / "epoch-0004")
    improved = rows[3]["val_loss"] < before["best"]
    if improved:
        assert after["best"] == rows[3]["val_loss"] and after["bad_epochs"] == 0
    else:  # the counters carried over from the 2-process run and went on counting
        assert after["best"] == before["best"] and after["bad_epochs"] == before["bad_epochs"] + 1
        assert after["scheduler_best"] == before["scheduler_best"]


def test_signal_to_one_rank_saves_mid_epoch_and_the_resumed_run_matches(tmp_path):
    data = make_image_folder(tmp_path / "data", {"anemic": 30, "non-anemic": 40})
    settings = ["train.batch_size=2", "train.epochs=3"]  # 56 training images: 14 steps per epoch and rank
    check(train(data, tmp_path, "whole", 2, *settings))

    args = [*SETTINGS, f"data.root={data}", f"run.output_dir={tmp_path}", "run.name=cut", *settings]
    # only rank 1 gets SIGUSR1, at its 5th step of epoch 2
    cut = launch([script("signal_at_step.py"), "1", str(14 + 5), *args], num_processes=2)
    output = cut.stdout + cut.stderr
    assert cut.returncode != 0, output[-3000:]
    assert re.search(rf"exitcode\s*:\s*{PREEMPTED_EXIT_CODE}", output), output[-3000:]

    marker = json.loads((tmp_path / "cut" / PREEMPTED).read_text())
    saved = Path(marker["checkpoint"])
    progress = read_info(saved)["progress"]
    # Both ranks stopped after step 6: the flags of step 5 are all-reduced without waiting and read after step 6.
    assert (progress["epoch"], progress["step"]) == (1, 6), progress
    assert saved.name == "epoch-0001-step-000006"
    assert [r["epoch"] for r in read_metrics(tmp_path / "cut")] == [1]

    check(train(data, tmp_path, "cut", 2, *settings, "run.resume=auto"))
    assert not (tmp_path / "cut" / PREEMPTED).exists()
    resumed, reference = read_metrics(tmp_path / "cut"), read_metrics(tmp_path / "whole")
    assert_same_rows(resumed, reference, from_epoch=2)


def test_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path):
    data = make_image_folder(tmp_path / "data", {"anemic": 10, "non-anemic": 14})
    args = [*SETTINGS, f"data.root={data}", f"run.output_dir={tmp_path}", "run.name=k", "train.epochs=5"]
    killed = subprocess.run(
        [sys.executable, script("kill_during_save.py"), "3", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL
    checkpoints = tmp_path / "k" / CHECKPOINTS
    torn = checkpoints / ".tmp-epoch-0003"
    assert (torn / WEIGHTS).exists() and not (torn / "optimizer.bin").exists()
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["epoch-0001", "epoch-0002"]

    result = check(train(data, tmp_path, "k", 1, "train.epochs=5", "run.resume=auto"))
    assert "resumed from" in result.stdout and "epoch-0002" in result.stdout
    assert [r["epoch"] for r in read_metrics(tmp_path / "k")] == [1, 2, 3, 4, 5]
    assert not torn.exists(), "the torn checkpoint is cleaned up"
    best = json.loads((tmp_path / "k" / SUMMARY).read_text())["best_epoch"]
    kept = {p.name for p in complete_checkpoints(checkpoints)}
    assert kept == {"epoch-0004", "epoch-0005", f"epoch-{best:04d}"}, "the last 2 (keep_last) and the best"


def test_resuming_with_another_arch_is_refused_naming_the_difference(tmp_path):
    data = make_image_folder(tmp_path / "data", {"anemic": 10, "non-anemic": 14})
    check(train(data, tmp_path, "a", 1, "train.epochs=1"))
    result = train(data, tmp_path, "a", 1, "train.epochs=2", "run.resume=auto", "model.arch=resnet34")
    assert result.returncode == 2
    assert "arch: checkpoint has 'resnet18', this config has 'resnet34'" in result.stderr


def test_an_existing_run_is_not_overwritten_without_resume(tmp_path):
    data = make_image_folder(tmp_path / "data", {"anemic": 10, "non-anemic": 14})
    check(train(data, tmp_path, "a", 1, "train.epochs=1"))
    before = (tmp_path / "a" / METRICS).read_text()
    result = train(data, tmp_path, "a", 1, "train.epochs=1")
    assert result.returncode == 2 and "run.resume=auto" in result.stderr
    assert (tmp_path / "a" / METRICS).read_text() == before
