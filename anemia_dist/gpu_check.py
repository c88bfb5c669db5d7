"""``anemia-dist gpu-check``: what only a GPU can show, one PASS/FAIL line per check.

Run on a new cluster, or whenever a GPU is at hand (``sbatch slurm/gpu_check.sbatch``); its
output goes into BENCHMARKS.md § GPU. The checks, in about 10 minutes on one GPU:

- the card, its driver and CUDA;
- ``anemia-dist bench`` eager and ``--compile``, judged against the targets (phase 1 at least
  85 % of forward-only, phase 2 at least 0.6× phase 1, end-to-end at least 5× the PIL pipeline);
- a 3-epoch training through the unfreeze under ``torch.cuda.set_sync_debug_mode("warn")``,
  counting the calls that wait for the GPU inside the training steps, per step;
- the same with ``train.compile=true``, counting the compiled graphs;
- the best model's validation scores against ``predict``'s for the same images;
- with two GPUs, that ``train.collective_timeout_minutes`` reaches NCCL: a rank waiting longer
  than it fails, one waiting less does not.
"""

from __future__ import annotations

import argparse
import csv
import math
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from .bench import default_precision, run_bench
from .config import Config, load_config
from .datasets import make_loaders
from .demo import make_synthetic_dataset
from .inference import load_model, predict
from .metrics import apply_temperature
from .run_dir import BEST, SPLITS
from .splits import build_split_on_main
from .trainer import make_accelerator, train
from .validation import validate

NO_GPU = (
    "anemia-dist gpu-check: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
    "run it on a GPU node, e.g. sbatch slurm/gpu_check.sbatch"
)
NO_GPU_EXIT_CODE = 3
TARGETS = {"phase1_vs_forward": 0.85, "phase2_vs_phase1": 0.6, "end_to_end": 5.0}
"""The GPU targets of BENCHMARKS.md: phase-1 share of forward-only, phase 2 against phase 1,
end-to-end cached against PIL."""
PROGRESS_BAR_READS_EVERY = 20
"""The training loop reads the loss back for its progress bar every this many steps."""
SYNCS_PER_EPOCH_ALLOWED = 4
"""Waits a training epoch may add besides the progress bar: its totals' reduce and read-back."""
SCORE_TOLERANCE = 1e-4
"""Validation and predict scores of one image: equal but for kernel choice by batch size."""


@dataclass
class Check:
    name: str
    passed: bool | None
    """None: skipped (the machine cannot run it)."""
    detail: str

    def line(self) -> str:
        status = "SKIP" if self.passed is None else "PASS" if self.passed else "FAIL"
        return f"{status}  {self.name}: {self.detail}"


# --------------------------------------------------------------------------- the card and the bench


def card_check() -> Check:
    properties = torch.cuda.get_device_properties(torch.cuda.current_device())
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        driver = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip()
    except (OSError, subprocess.SubprocessError):
        driver = "unknown (no nvidia-smi)"
    detail = (
        f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB, compute capability "
        f"{properties.major}.{properties.minor}, driver {driver}, CUDA {torch.version.cuda}, "
        f"torch {torch.__version__}, "
        f"{torch.cuda.device_count()} GPU(s), bf16 native: {torch.cuda.is_bf16_supported(including_emulation=False)}"
    )
    return Check("card", True, detail)


def judge_bench(results: dict, label: str) -> list[Check]:
    """The bench's numbers against the targets, one check per target (end-to-end: every image set)."""
    model = results["model"]
    checks = [
        Check(
            f"{label} phase 1 vs forward-only",
            model["phase1_vs_forward"] >= TARGETS["phase1_vs_forward"],
            f"{model['phase1_vs_forward']:.0%} (target >= {TARGETS['phase1_vs_forward']:.0%}; "
            f"{model['phase1_images_per_s']:.0f} vs {model['forward_images_per_s']:.0f} images/s)",
        ),
        Check(
            f"{label} phase 2 vs phase 1",
            model["phase2_vs_phase1"] >= TARGETS["phase2_vs_phase1"],
            f"{model['phase2_vs_phase1']:.2f}x (target >= {TARGETS['phase2_vs_phase1']}x; "
            f"{model['phase2_images_per_s']:.0f} images/s)",
        ),
    ]
    for row in results["end_to_end"]:
        checks.append(
            Check(
                f"{label} end-to-end {row['set']}",
                row["ratio"] >= TARGETS["end_to_end"],
                f"{row['ratio']:.1f}x the PIL pipeline (target >= {TARGETS['end_to_end']}x; "
                f"cached {row['cached_images_per_s']:.0f}, PIL {row['pil_images_per_s']:.0f} images/s)",
            )
        )
    return checks


def bench_checks(runs: dict[str, argparse.Namespace]) -> list[Check]:
    """Each bench run (its label: its parsed ``anemia-dist bench`` arguments), judged."""
    checks = []
    for label, args in runs.items():
        started = time.perf_counter()
        checks += judge_bench(run_bench(args), label)
        checks[-1].detail += f"  [{label}: {time.perf_counter() - started:.0f} s]"
    return checks


# --------------------------------------------------------------------------- training under watch


@dataclass
class Syncs:
    """Synchronising CUDA calls, by where they came from."""

    in_steps: int = 0
    """Inside ``train_one_epoch`` (the training steps and the epoch's totals)."""
    elsewhere: Counter | None = None
    """Everything else (validation, checkpoints, the report), by the package function calling it."""


@contextmanager
def counting_syncs() -> Iterator[Syncs]:
    """``torch.cuda.set_sync_debug_mode("warn")``, each warning attributed by the call stack."""
    syncs = Syncs(elsewhere=Counter())

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            return
        stack = traceback.extract_stack()
        if any(frame.name == "train_one_epoch" for frame in stack):
            syncs.in_steps += 1
        else:
            own = [f"{Path(f.filename).stem}.{f.name}" for f in stack if "anemia_dist" in f.filename]
            syncs.elsewhere[own[-2] if len(own) > 1 else "outside the package"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield syncs
        finally:
            torch.cuda.set_sync_debug_mode("default")


def training_config(data: Path, output: Path, name: str, arch: str, compiled: bool) -> Config:
    """Three epochs on the synthetic dataset, the backbone's layer4 unfrozen from epoch 2."""
    precision = default_precision(torch.device("cuda"))
    return load_config(
        "demo",
        [
            f"data.manifest={data}",
            "data.num_workers=4",
            f"model.arch={arch}",
            "train.epochs=3",
            "train.batch_size=32",
            "unfreeze.head_only_epochs=1",
            f"train.mixed_precision={'no' if precision == 'fp32' else precision}",
            f"train.compile={'true' if compiled else 'false'}",
            f"run.output_dir={output}",
            f"run.name={name}",
        ],
    )


def train_checks(cfg: Config, label: str) -> list[Check]:
    """One watched training run: its waits for the GPU per step, and (compiled) its graphs."""
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    started = time.perf_counter()
    with counting_syncs() as syncs:
        summary = train(cfg)
    seconds = time.perf_counter() - started
    with open(Path(summary["run_dir"]) / SPLITS, newline="") as handle:
        train_images = sum(row["split"] == "train" for row in csv.DictReader(handle))
    per_epoch = math.ceil(train_images / cfg.train.batch_size)
    steps, epochs = per_epoch * summary["epochs_run"], summary["epochs_run"]
    allowed = epochs * (math.ceil(per_epoch / PROGRESS_BAR_READS_EVERY) + SYNCS_PER_EPOCH_ALLOWED)
    top = ", ".join(f"{where} {n}" for where, n in syncs.elsewhere.most_common(4))
    # Compiling waits for the GPU too (kernel benchmarks) inside the first steps: counted, not judged.
    judged = syncs.in_steps <= allowed or cfg.train.compile
    checks = [
        Check(
            f"{label} waits for the GPU in training steps" + (" (compilation included)" if cfg.train.compile else ""),
            epochs == cfg.train.epochs and judged,
            f"{syncs.in_steps} in {steps} steps ({syncs.in_steps / steps:.2f} per step, allowed {allowed}: the "
            f"progress bar's loss every {PROGRESS_BAR_READS_EVERY} steps and each epoch's totals); "
            f"outside the steps {sum(syncs.elsewhere.values())} ({top}); {epochs} epochs, unfrozen from epoch 2, "
            f"{cfg.train.mixed_precision}, {seconds:.0f} s",
        )
    ]
    if cfg.train.compile:
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
        checks.append(
            Check(
                f"{label} compiled graphs",
                graphs <= 4,
                f"{graphs} (expected 4: training and validation, before and after the unfreeze; dynamo's "
                f"recompile limit is {torch._dynamo.config.recompile_limit})",
            )
        )
    return checks


def scores_check(cfg: Config) -> Check:
    """The best model's scores for the validation images: as training's validation computes them
    (the cached loader, Accelerate's autocast) and as ``predict`` computes them from the files."""
    best = Path(cfg.run.output_dir) / cfg.run.name / BEST
    split = build_split_on_main(cfg.data, cfg.train.seed, True)
    _, val_loader = make_loaders(cfg, split, pin_memory=True)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    model, meta, point = load_model(best)
    model = accelerator.prepare_model(model, evaluation_mode=True)
    val = validate(accelerator, model, accelerator.prepare_data_loader(val_loader), torch.ones(len(meta["classes"])))
    positive = meta["classes"].index(point.positive_class)
    validation = apply_temperature(val.probs.numpy(), point.temperature)[:, positive]
    paths = [s.path for s in split.val]
    rows = predict(best, paths, batch_size=cfg.train.batch_size, num_workers=4, quality_gate=False)
    by_path = {row["path"]: row["probability"] for row in rows}
    predicted = np.array([float(by_path[str(path)]) for path in paths])
    flipped = int(((validation >= point.threshold) != (predicted >= point.threshold)).sum())
    gap = float(np.abs(validation - predicted).max())
    return Check(
        "validation vs predict scores",
        flipped == 0 and gap <= SCORE_TOLERANCE,
        f"{len(rows)} images, largest difference {gap:.2e} (tolerance {SCORE_TOLERANCE}), {flipped} decision(s) "
        f"changed at the threshold {point.threshold:.4f}; meta.json mixed_precision {meta.get('mixed_precision')}",
    )


# --------------------------------------------------------------------------- the collective timeout


def collective_probe(sleep_seconds: float, minutes: float) -> int:
    """One rank of the timeout check: the main process works alone for ``sleep_seconds`` while the
    others wait at a barrier, with ``train.collective_timeout_minutes=minutes``."""
    cfg = load_config(None, [f"train.collective_timeout_minutes={minutes}"])
    accelerator = make_accelerator(cfg)
    accelerator.wait_for_everyone()  # NCCL's communicator is built at the first collective: before the wait
    if accelerator.is_main_process:
        time.sleep(sleep_seconds)
    accelerator.wait_for_everyone()
    print(f"rank {accelerator.process_index}: through the barrier")
    return 0


def collective_checks(launcher: Callable[[int, list[str]], list[str]], sleep_seconds: float = 20) -> list[Check]:
    """Two ranks over NCCL: a wait longer than the configured timeout fails, a shorter one passes."""
    if torch.cuda.device_count() < 2:
        return [Check("NCCL collective timeout", None, "needs two GPUs on this node")]
    checks = []
    for minutes, should_pass in ((sleep_seconds / 60 / 4, False), (sleep_seconds / 60 * 3, True)):
        probe = ["-m", "anemia_dist", "gpu-check", "--collective-probe", str(sleep_seconds), str(minutes)]
        started = time.perf_counter()
        try:
            done = subprocess.run(launcher(2, probe), capture_output=True, text=True, timeout=300)
            passed, code = done.returncode == 0, done.returncode
        except subprocess.TimeoutExpired:
            passed, code = False, "killed after 300 s"
        checks.append(
            Check(
                f"NCCL collective timeout {minutes * 60:.0f} s, main process busy {sleep_seconds:.0f} s",
                passed == should_pass,
                f"{'went through' if passed else 'timed out'} as expected (exit {code}, "
                f"{time.perf_counter() - started:.0f} s)"
                if passed == should_pass
                else f"{'went through' if passed else 'failed'} (exit {code}): the timeout did not reach NCCL",
            )
        )
    return checks


# --------------------------------------------------------------------------- all of it


def run_gpu_check(
    bench_runs: dict[str, argparse.Namespace],
    launcher: Callable[[int, list[str]], list[str]],
    arch: str,
    workdir: str | None = None,
) -> int:
    """Every check in turn, its line printed as it completes; exit 1 when any failed."""
    if not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return NO_GPU_EXIT_CODE
    checks: list[Check] = []

    def report(new: list[Check]) -> None:
        for check in new:
            print(check.line(), flush=True)
        checks.extend(new)

    report([card_check()])
    report(bench_checks(bench_runs))
    with tempfile.TemporaryDirectory(prefix="anemia-gpu-check-", dir=workdir) as scratch:
        data = make_synthetic_dataset(Path(scratch) / "data")
        eager = training_config(data, Path(scratch), "eager", arch, compiled=False)
        report(train_checks(eager, "training"))
        report([scores_check(eager)])
        report(train_checks(training_config(data, Path(scratch), "compiled", arch, compiled=True), "compiled training"))
    report(collective_checks(launcher))
    failed = [check.name for check in checks if check.passed is False]
    print(
        f"gpu-check: {len(checks) - len(failed)} of {len(checks)} passed or skipped"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0
