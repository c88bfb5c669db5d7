"""The datasets and loaders training reads: the decoded-image cache (default) or the PIL pipeline.

``data.pipeline=gpu`` decodes every image once into uint8 tensors at a working size, read by the
loader workers. Medical datasets are small (hundreds to a few thousand images), so the whole decoded set fits
in memory: at the default 224 px training size an image is 3 × 269 × 269 bytes (217 KB), 1,000
images 0.2 GB. Each image is decoded once (JPEGs at a reduced DCT scale), composited onto the
background, resized to a square a little larger than the training size (the augmentation
zooms in by up to 1.2×) and kept as uint8; the random augmentation then runs on the training
device (:mod:`anemia_dist.batch_augment`). With ``data.cache_dir`` the decoded images are also
stored on disk, keyed by the file's content hash, the working size and the background, so a
later run (or another fold) starts without decoding.

The loader workers read the same memory: forked workers share its pages (nothing writes to
them, so nothing is copied), and under spawn torch's pickling moves it to shared memory.
``data.pipeline=pil`` is the methodology as usually written: each image decoded and augmented
with PIL transforms (:mod:`anemia_dist.transforms`) in the loader workers, every epoch.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .batch_augment import EvalResize, TrainAugment
from .config import Config, DataConfig
from .errors import DataError
from .images import load_rgb, working_size
from .model import preprocessing
from .sampling import BalancedSampler
from .sources import Sample
from .splits import SplitData
from .transforms import eval_transform, train_transform

logger = get_logger(__name__)

FORMAT_VERSION = 2
"""Part of every disk key: bump it when decoding changes, and old entries are ignored (2: embedded
colour profiles are converted to sRGB)."""


def content_key(path: str | Path, size: int, background: Sequence[int]) -> str:
    """The disk-cache key: the file's SHA-256, plus everything that changes the decoded pixels."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    r, g, b = background
    return f"{digest.hexdigest()}-{size}px-bg{r}.{g}.{b}-v{FORMAT_VERSION}"


def decode(path: str | Path, size: int, background: Sequence[int]) -> torch.Tensor:
    """One file -> uint8 [3, size, size], resized like torchvision's ``Resize((size, size))``."""
    try:
        image = load_rgb(path, tuple(background), min_side=size)
    except OSError as error:
        raise DataError(f"{path}: cannot decode this image ({error}); fix or remove the file") from None
    array = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


@dataclass
class CacheStats:
    decoded: int = 0
    """Images decoded from their files."""
    from_disk: int = 0
    """Images read from ``cache_dir``."""
    written: int = 0
    """New ``cache_dir`` entries."""


class _DecodeOrLoad(Dataset):
    """Loader-worker job: read the image from the disk cache if present, else decode it."""

    def __init__(self, paths: Sequence[str], size: int, background: Sequence[int], cache_dir: Path | None):
        self.paths, self.size, self.background, self.cache_dir = list(paths), size, tuple(background), cache_dir

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str | None, bool]:
        path = self.paths[index]
        key = content_key(path, self.size, self.background) if self.cache_dir is not None else None
        if key is not None:
            stored = _read_entry(self.cache_dir / f"{key}.npy", self.size)
            if stored is not None:
                return stored, key, False
        return decode(path, self.size, self.background), key, True


class DecodedOnAccess(Dataset):
    """The cache's decode, one file per access in the loader workers (stored ``cache_dir`` entries
    are read, none written): for evaluate and predict, which see each image once, so their inputs
    are the very pixels training validated on."""

    def __init__(self, paths: Sequence[str], size: int, background: Sequence[int], cache_dir: str | Path | None):
        self.jobs = _DecodeOrLoad(paths, size, background, Path(cache_dir) if cache_dir is not None else None)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.jobs[index][0]


def _read_entry(path: Path, size: int) -> torch.Tensor | None:
    """A stored image, or None when absent or unusable (it is then decoded and rewritten)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if array.dtype != np.uint8 or array.shape != (3, size, size):
        return None
    return torch.from_numpy(array)


def _write_entry(directory: Path, key: str, image: torch.Tensor) -> None:
    """Atomic: a reader (or a crash) never sees half a file."""
    target = directory / f"{key}.npy"
    tmp = directory / f".{key}.tmp-{os.getpid()}.npy"
    np.save(tmp, image.numpy(), allow_pickle=False)
    os.replace(tmp, target)


def decode_all(
    paths: Sequence[str],
    size: int,
    background: Sequence[int],
    num_workers: int = 0,
    cache_dir: str | Path | None = None,
    write: bool = True,
) -> tuple[torch.Tensor, CacheStats]:
    """Every image of ``paths`` as one uint8 tensor [N, 3, size, size].

    Decoding runs in ``num_workers`` loader processes. With ``cache_dir``, stored images are read
    instead of decoded, and (when ``write``) newly decoded ones are stored.
    """
    directory = Path(cache_dir) if cache_dir is not None else None
    if directory is not None and write:
        directory.mkdir(parents=True, exist_ok=True)
    images = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    stats = CacheStats()
    jobs = _DecodeOrLoad(paths, size, background, directory)
    loader = DataLoader(jobs, batch_size=None, num_workers=min(num_workers, len(paths)))
    for index, (image, key, decoded) in enumerate(loader):
        images[index] = image
        if not decoded:
            stats.from_disk += 1
            continue
        stats.decoded += 1
        if directory is not None and write:
            _write_entry(directory, key, image)
            stats.written += 1
    return images, stats


class CachedImages(Dataset):
    """(uint8 image [3, W, W], label) pairs from the decoded tensor (or :class:`DecodedOnAccess`).

    ``batch_transform`` finishes a collated batch on the training device (augmentation or
    resize, then normalisation); the trainer applies it after the batch is moved there.
    """

    def __init__(self, images: torch.Tensor | DecodedOnAccess, labels: Sequence[int], batch_transform: Callable):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.batch_transform = batch_transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


def cached_datasets(
    cfg: DataConfig, split: SplitData, channels_last: bool, normalization: tuple[Sequence[float], Sequence[float]]
) -> tuple[CachedImages, CachedImages]:
    """The training set at the working size, the validation set straight at the training size.

    Validation images are decoded at ``image_size``, so training-time validation sees the same
    pixels as ``evaluate``/``predict`` (no second resize) and the saved threshold fits them.
    Every process holds its own copy in memory. With ``data.cache_dir`` the main process decodes
    and writes first while the others wait, then they read its entries (only the main process
    writes files); without it, every process decodes for itself.
    """
    state = PartialState()
    sizes = {"train": working_size(cfg.image_size), "val": cfg.image_size}
    parts = {"train": [s.path for s in split.train], "val": [s.path for s in split.val]}
    images, stats = {}, CacheStats()
    with state.main_process_first() if cfg.cache_dir is not None else contextlib.nullcontext():
        for name, paths in parts.items():
            images[name], part_stats = decode_all(
                paths, sizes[name], cfg.alpha_background, cfg.num_workers, cfg.cache_dir, write=state.is_main_process
            )
            stats.decoded, stats.from_disk = stats.decoded + part_stats.decoded, stats.from_disk + part_stats.from_disk
    stored = f", {stats.from_disk} read from {cfg.cache_dir}" if cfg.cache_dir is not None else ""
    megabytes = sum(t.numel() for t in images.values()) / 2**20
    logger.info(
        f"decoded-image cache: {len(parts['train'])} training images at {sizes['train']}px, {len(parts['val'])} "
        f"validation images at {sizes['val']}px, {megabytes:.1f} MiB per process; {stats.decoded} decoded{stored}"
    )
    return (
        CachedImages(
            images["train"],
            [s.label for s in split.train],
            TrainAugment(cfg.image_size, channels_last, normalization=normalization),
        ),
        CachedImages(
            images["val"], [s.label for s in split.val], EvalResize(cfg.image_size, channels_last, normalization)
        ),
    )


class ImageDataset(Dataset):
    """The PIL pipeline: (image tensor, label) pairs decoded with :func:`load_rgb` and transformed
    per image, every time they are read."""

    def __init__(self, samples: Sequence[Sample], transform: Callable, background: Sequence[int]):
        self.samples = list(samples)
        self.transform = transform
        self.background = tuple(background)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        return self.transform(load_rgb(sample.path, self.background)), sample.label


def seed_worker(rank: int, worker_id: int) -> None:
    """A loader worker's random streams, its rank's own (``worker_init_fn``).

    torch seeds worker ``w`` with ``base + w``, ``base`` drawn from the loader's generator, which is
    seeded alike on every rank (it must be: it fixes the shuffle all ranks shard). Without the rank
    mixed in, every rank's PIL augmentation would draw the same flips and crops.
    """
    entropy = [torch.initial_seed() % 2**63, rank, worker_id]
    seed = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def make_loaders(
    cfg: Config, split: SplitData, pin_memory: bool, rank: int | None = None
) -> tuple[DataLoader, DataLoader]:
    """The training and validation loaders of ``data.pipeline``, before Accelerate shards them;
    ``rank`` (default: this process's) seeds the loader workers."""
    workers = cfg.data.num_workers
    rank = PartialState().process_index if rank is None else rank
    common = dict(
        batch_size=cfg.train.batch_size,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        worker_init_fn=functools.partial(seed_worker, rank),
    )
    backbone = preprocessing(cfg.model.arch)
    normalization = (backbone["mean"], backbone["std"])
    if cfg.data.pipeline == "gpu":
        train, val = cached_datasets(cfg.data, split, cfg.train.channels_last, normalization)
    else:
        background = cfg.data.alpha_background
        train = ImageDataset(split.train, train_transform(cfg.data.image_size, *normalization), background)
        val = ImageDataset(split.val, eval_transform(cfg.data.image_size, *normalization), background)
    # Own generators: creating a loader iterator otherwise draws from the global RNG, which the
    # checkpoints restore, and a mid-epoch resume (a fresh iterator) would start one draw off.
    order = BalancedSampler([s.label for s in split.train], cfg.train.seed) if cfg.train.sampler == "balanced" else None
    return (
        DataLoader(
            train,
            shuffle=order is None,
            sampler=order,
            generator=torch.Generator().manual_seed(cfg.train.seed),
            **common,
        ),
        DataLoader(val, shuffle=False, generator=torch.Generator().manual_seed(cfg.train.seed), **common),
    )


def device_transform(loader: DataLoader) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the training device does to a batch before the model: the cached pipeline's batched
    augmentation (or validation resize) and normalisation; PIL-pipeline batches arrive finished."""
    return getattr(loader.dataset, "batch_transform", torch.nn.Identity())
