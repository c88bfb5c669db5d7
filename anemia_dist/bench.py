"""``anemia-dist bench``: the PIL input pipeline against the cached one, and the model's rates.

In one process, on the same images: the PIL pipeline (PIL from disk every epoch, the
methodology's transforms, a DataLoader) against the decoded-image cache plus batched
augmentation on the device, with the same worker count and the same augmentation; then the
training rate of phase 1 (frozen backbone) and phase 2 (``unfreeze.layers`` trainable) against
a forward-only pass of the same model; then whole phase-1 training steps fed by each pipeline.
The model, optimiser and step are the trainer's own, set up from the config's defaults.
Without ``--data`` it writes its own JPEGs: 640×480 and 3000×4000 (12 MP phone photos).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from torch.utils.data import DataLoader

from .batch_augment import TrainAugment
from .config import Config, load_config
from .datasets import CachedImages, ImageDataset, decode_all
from .errors import DataError
from .images import IMAGE_EXTENSIONS, working_size
from .model import build_model, freeze_backbone, set_train_mode
from .sources import Sample, find_image_files
from .splits import balanced_class_weights
from .torch_settings import any_batch_size
from .trainer import apply_speed_settings, build_optimizer, training_step, unfreeze_stages
from .transforms import train_transform

GENERATED_SETS = {"640x480": (640, 480), "3000x4000": (3000, 4000)}


@dataclass
class DataResult:
    set: str
    images: int
    pil_images_per_s: float
    cached_images_per_s: float
    ratio: float
    cache_build_s: float
    decoded: int


@dataclass
class ModelResult:
    forward_images_per_s: float
    phase1_images_per_s: float
    phase2_images_per_s: float
    phase1_vs_forward: float
    phase2_vs_phase1: float


@dataclass
class EndToEndResult:
    set: str
    pil_images_per_s: float
    cached_images_per_s: float
    ratio: float


# --------------------------------------------------------------------------- images


def make_photos(folder: Path, count: int, size: tuple[int, int], seed: int) -> list[Sample]:
    """JPEGs that compress and decode like photos: smooth colour fields plus sensor-like grain."""
    rng = np.random.default_rng(seed)
    grain = rng.integers(-10, 11, (256, 256, 3), dtype=np.int16)
    width, height = size
    tiled = np.tile(grain, (height // 256 + 1, width // 256 + 1, 1))[:height, :width]
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(count):
        coarse = Image.fromarray(rng.integers(30, 226, (6, 8, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
        path = folder / f"photo_{i:03d}.jpg"
        Image.fromarray(np.clip(smooth + tiled, 0, 255).astype(np.uint8)).save(path, quality=90)
        samples.append(Sample(str(path), i % 2, str(path)))
    return samples


def image_sets(args: argparse.Namespace, scratch: Path) -> dict[str, list[Sample]]:
    if args.data is not None:
        files = find_image_files(args.data)
        if not files:
            raise DataError(f"{args.data}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
        return {Path(args.data).name: [Sample(str(p), i % 2, str(p)) for i, p in enumerate(files)]}
    counts = {"640x480": args.small, "3000x4000": args.large}
    return {
        name: make_photos(scratch / name, counts[name], size, seed=i)
        for i, (name, size) in enumerate(GENERATED_SETS.items())
        if counts[name] > 0
    }


# --------------------------------------------------------------------------- measuring


def rate(
    batches: Iterator[int],
    sync: Callable[[], None],
    min_seconds: float = 0.0,
    min_images: int = 0,
    steps: int = 0,
    warmup: int = 1,
) -> float:
    """Images/s after ``warmup`` untimed batches (worker start-up, first decode, kernel selection)."""
    for _ in range(warmup):
        next(batches)
    sync()
    start, seen, done = time.perf_counter(), 0, 0
    for n in batches:
        seen, done = seen + n, done + 1
        if done >= steps and seen >= min_images and time.perf_counter() - start >= min_seconds:
            break
    sync()
    elapsed = time.perf_counter() - start
    batches.close()
    return seen / elapsed


def endless(loader: DataLoader, finish: Callable, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        for images, labels in loader:
            yield finish(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)


def loader_for(dataset, args: argparse.Namespace, device: torch.device) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
    )


def pil_loader(samples: list[Sample], cfg: Config, args: argparse.Namespace, device: torch.device) -> DataLoader:
    dataset = ImageDataset(samples, train_transform(cfg.data.image_size), cfg.data.alpha_background)
    return loader_for(dataset, args, device)


def cached_loader(
    samples: list[Sample], cfg: Config, args: argparse.Namespace, device: torch.device
) -> tuple[DataLoader, float, int]:
    started = time.perf_counter()
    size = working_size(cfg.data.image_size)
    images, stats = decode_all([s.path for s in samples], size, cfg.data.alpha_background, args.workers)
    built = time.perf_counter() - started
    dataset = CachedImages(images, [s.label for s in samples], TrainAugment(cfg.data.image_size))
    return loader_for(dataset, args, device), built, stats.decoded


def data_rates(
    name: str, samples: list[Sample], cfg: Config, args: argparse.Namespace, device: torch.device, sync
) -> DataResult:
    identity = torch.nn.Identity()
    pil = rate(
        (len(x) for x, _ in endless(pil_loader(samples, cfg, args, device), identity, device)),
        sync,
        args.seconds,
        len(samples),
    )
    loader, built, decoded = cached_loader(samples, cfg, args, device)
    cached = rate(
        (len(x) for x, _ in endless(loader, loader.dataset.batch_transform, device)), sync, args.seconds, len(samples)
    )
    return DataResult(name, len(samples), pil, cached, cached / pil, built, decoded)


def bench_config(args: argparse.Namespace) -> Config:
    """The training defaults, with the command line's architecture, image size, batch and compile
    (random init: the rates do not depend on the weights)."""
    return load_config(
        None,
        [
            f"model.arch={args.arch}",
            "model.weights=none",
            f"data.image_size={'null' if args.image_size is None else args.image_size}",
            f"train.batch_size={args.batch_size}",
            f"train.compile={'true' if args.compile else 'false'}",
        ],
    )


class Trainer:
    """The trainer's own set-up and step on one device, under Accelerate as in training: the
    backbone frozen (phase 1) until :meth:`unfreeze` makes ``unfreeze.layers`` trainable (phase 2)."""

    def __init__(self, cfg: Config, args: argparse.Namespace, device: torch.device, class_weights: torch.Tensor):
        mixed_precision = "no" if args.precision == "fp32" else args.precision
        self.accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision)
        self.cfg = cfg
        model = build_model(cfg.model, len(class_weights), cfg.data.image_size)
        freeze_backbone(model)
        apply_speed_settings(model, cfg.train)
        self.model, self.optimizer = self.accelerator.prepare(
            model, build_optimizer(model, cfg, fused=self.accelerator.device.type == "cuda")
        )
        self.class_weights = class_weights.to(self.accelerator.device)

    def forward_only(self, images: torch.Tensor) -> None:
        self.model.eval()
        with torch.no_grad():
            self.model(any_batch_size(images))

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        set_train_mode(self.accelerator.unwrap_model(self.model))
        images = any_batch_size(images)  # as training: one compiled variant for every batch size
        training_step(self.model, self.optimizer, images, labels, self.class_weights, self.accelerator.backward)

    def unfreeze(self) -> None:
        self.model = unfreeze_stages(self.accelerator, self.model, self.cfg)


def model_rates(trainer: Trainer, args: argparse.Namespace, device: torch.device, sync) -> ModelResult:
    size = trainer.cfg.data.image_size
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 2, (args.batch_size,), device=device)

    def forward() -> Iterator[int]:
        while True:
            trainer.forward_only(images)
            yield args.batch_size

    def training() -> Iterator[int]:
        while True:
            trainer.step(images, labels)
            yield args.batch_size

    forward_rate = rate(forward(), sync, steps=args.steps, warmup=3)
    phase1 = rate(training(), sync, steps=args.steps, warmup=3)
    trainer.unfreeze()
    phase2 = rate(training(), sync, steps=args.steps, warmup=3)
    return ModelResult(forward_rate, phase1, phase2, phase1 / forward_rate, phase2 / phase1)


def warmup_batches(loader: DataLoader, compiled: bool) -> int:
    """Untimed batches before an end-to-end rate: two (workers started, kernels chosen), and when
    compiled a whole epoch and one more, so every batch shape (the smaller last batch, the first
    of the next epoch) has compiled before the clock starts."""
    return len(loader) + 1 if compiled else 2


def end_to_end(
    name: str,
    samples: list[Sample],
    cfg: Config,
    args: argparse.Namespace,
    device: torch.device,
    class_weights: torch.Tensor,
    sync,
) -> EndToEndResult:
    """Phase-1 training steps fed by each pipeline (a fresh model each, same settings)."""

    def run(loader: DataLoader, finish: Callable) -> float:
        trainer = Trainer(cfg, args, device, class_weights)

        def steps() -> Iterator[int]:
            for images, labels in endless(loader, finish, device):
                trainer.step(images, labels)
                yield len(images)

        return rate(steps(), sync, steps=args.e2e_steps, warmup=warmup_batches(loader, cfg.train.compile))

    pil = run(pil_loader(samples, cfg, args, device), torch.nn.Identity())
    loader, _, _ = cached_loader(samples, cfg, args, device)
    cached = run(loader, loader.dataset.batch_transform)
    return EndToEndResult(name, pil, cached, cached / pil)


# --------------------------------------------------------------------------- reporting


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"cpu": cpu, "cpu_cores": cores, "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def table(results: dict) -> str:
    """The results as the text table ``anemia-dist bench`` prints."""
    c = results["config"]
    lines = [
        f"machine: {results['machine']}",
        f"data path: {c['image_size']} px, batch {c['batch_size']}, {c['workers']} loader worker(s), "
        f"{c['data_threads']} torch thread(s), same augmentation (images/s, steady state)",
        f"  {'set':<12}{'images':>7}{'PIL':>12}{'cached':>10}{'ratio':>9}   cache build",
    ]
    for r in results["data"]:
        lines.append(
            f"  {r['set']:<12}{r['images']:>7}{r['pil_images_per_s']:>12.1f}{r['cached_images_per_s']:>10.1f}"
            f"{r['ratio']:>8.1f}x   {r['cache_build_s']:.2f} s ({r['decoded']} decoded, once)"
        )
    m = results["model"]
    lines += [
        f"model: {c['arch']}, {c['precision']}, batch {c['batch_size']}, channels_last, "
        f"compile={c['compile']} (images/s)",
        f"  forward only     {m['forward_images_per_s']:>9.1f}",
        f"  phase 1 train    {m['phase1_images_per_s']:>9.1f}   {m['phase1_vs_forward']:.0%} of forward-only",
        f"  phase 2 train    {m['phase2_images_per_s']:>9.1f}   {m['phase2_vs_phase1']:.2f}x phase 1",
    ]
    if results["end_to_end"]:
        lines.append("end-to-end phase-1 training (images/s)")
        for r in results["end_to_end"]:
            lines.append(
                f"  {r['set']:<12}PIL {r['pil_images_per_s']:>8.1f}   cached {r['cached_images_per_s']:>8.1f}"
                f"   {r['ratio']:.1f}x"
            )
    return "\n".join(lines)


def default_precision(device: torch.device) -> str:
    """What training would use: bf16 where the card computes it natively (Ampere and newer), fp16
    on older cards (V100, T4: there bf16 is only emulated), fp32 on the CPU."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for the measured device (``torch.cuda.synchronize()`` alone waits for the current
    device, which need not be the one measured)."""
    if device.type != "cuda":
        return lambda: None
    return lambda: torch.cuda.synchronize(device)


def run_bench(args: argparse.Namespace) -> dict:
    """Every measurement, as the JSON-ready dict ``anemia-dist bench`` writes."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # the card measured, by index
    if args.workers is None:
        args.workers = 8 if device.type == "cuda" else 0
    if args.precision is None:
        args.precision = default_precision(device)
    sync = synchronizer(device)
    cfg = bench_config(args)
    threads = torch.get_num_threads()
    # On the CPU both pipelines get the same cores: the loader workers, or this one process.
    data_threads = max(1, args.workers) if device.type == "cpu" else threads
    config = {**{k: v for k, v in vars(args).items() if k != "func"}, "data_threads": data_threads}
    results: dict = {"machine": machine(device), "config": config, "data": [], "model": None, "end_to_end": []}
    with tempfile.TemporaryDirectory(prefix="anemia-bench-") as scratch:
        sets = image_sets(args, Path(scratch))
        class_weights = balanced_class_weights([s for samples in sets.values() for s in samples], num_classes=2)
        torch.set_num_threads(data_threads)
        for name, samples in sets.items():
            results["data"].append(asdict(data_rates(name, samples, cfg, args, device, sync)))
        torch.set_num_threads(threads)
        results["model"] = asdict(model_rates(Trainer(cfg, args, device, class_weights), args, device, sync))
        if args.e2e_steps > 0:
            for name, samples in sets.items():
                result = end_to_end(name, samples, cfg, args, device, class_weights, sync)
                results["end_to_end"].append(asdict(result))
    return results
