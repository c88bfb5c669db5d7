"""``anemia-dist gpu-check`` without a GPU: its clear refusal, how it judges the bench, how it
attributes the waits for the GPU, and its collective-timeout probe on two gloo ranks."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import launch

from anemia_dist.cli import main
from anemia_dist.gpu_check import NO_GPU, NO_GPU_EXIT_CODE, TARGETS, counting_syncs, judge_bench


def test_without_a_gpu_the_check_says_so_and_exits_non_zero(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["gpu-check"]) == NO_GPU_EXIT_CODE
    assert NO_GPU in capsys.readouterr().err
    assert "slurm/gpu_check.sbatch" in NO_GPU


def bench_results(phase1: float, phase2: float, end_to_end: float) -> dict:
    return {
        "model": {
            "forward_images_per_s": 1000.0,
            "phase1_images_per_s": 1000.0 * phase1,
            "phase2_images_per_s": 1000.0 * phase1 * phase2,
            "phase1_vs_forward": phase1,
            "phase2_vs_phase1": phase2,
        },
        "end_to_end": [{"set": "640x480", "ratio": end_to_end, "cached_images_per_s": 1.0, "pil_images_per_s": 1.0}],
    }


def test_the_bench_is_judged_against_each_target():
    on_target = judge_bench(bench_results(*TARGETS.values()), "bench")
    assert [check.passed for check in on_target] == [True, True, True]
    short = judge_bench(bench_results(0.84, 0.59, 4.9), "bench")
    assert [check.passed for check in short] == [False, False, False]
    assert all(line.line().startswith("FAIL  bench ") for line in short)


def test_waits_for_the_gpu_are_counted_inside_the_training_steps_and_elsewhere_by_caller(monkeypatch):
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def sync() -> None:
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)

    def train_one_epoch() -> None:
        sync()
        sync()

    with counting_syncs() as syncs:
        train_one_epoch()
        sync()
        warnings.warn("something else", UserWarning, stacklevel=1)  # not a sync: not counted
    assert syncs.in_steps == 2
    assert sum(syncs.elsewhere.values()) == 1
    assert modes == ["warn", "default"]


@pytest.mark.multiprocess
def test_the_configured_collective_timeout_reaches_the_process_group():
    # gpu-check's probe (on two NCCL ranks there), here on two gloo ranks: the main process is busy
    # for 6 s while the other waits at a barrier with train.collective_timeout_minutes=0.05 (3 s).
    result = launch(["-m", "anemia_dist", "gpu-check", "--collective-probe", "6", "0.05"], timeout=120)
    assert result.returncode != 0, result.stdout
    assert "Timed out waiting 3000ms" in result.stderr  # the configured 3 s, not gloo's default 30 min
