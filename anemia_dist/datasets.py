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
them, so nothing is copied), and under spawn torch's pickling moves it to shared memory. With
several processes on a node, the node's local main process decodes once into a node-local file
that every rank of the node maps (``data.node_cache_dir``).
``data.pipeline=pil`` is the methodology as usually written: each image decoded and augmented
with PIL transforms (:mod:`anemia_dist.transforms`) in the loader workers, every epoch.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import random
import shutil
import tempfile
import uuid
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
from .distributed import broadcast_from_main
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


def node_files(cfg: DataConfig, parts: dict[str, list[str]]) -> dict[str, Path]:
    """Where this run's node-shared cache files go: one per split, named by a token the main
    process draws (the same on every rank, unique per run)."""
    directory = Path(cfg.node_cache_dir) if cfg.node_cache_dir is not None else Path(tempfile.gettempdir())
    token = broadcast_from_main(uuid.uuid4().hex)
    return {name: directory / f"anemia-dist-{token}-{name}.npy" for name in parts}


def _write_node_file(path: Path, images: torch.Tensor) -> None:
    """Atomic, so a rank never maps half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            np.save(handle, images.numpy(), allow_pickle=False)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"{path.parent}: cannot write the node's decoded-image cache ({error}); "
            f"point data.node_cache_dir at a node-local folder with {images.numel() / 2**30:.1f} GiB free"
        ) from None


def share_on_node(state: PartialState, files: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Every rank maps its node's files (copy-on-write: the pages stay shared, one copy per node in
    the page cache, and forked loader workers share them too); once all have, the files are
    unlinked, and the memory goes when the last rank exits."""
    state.wait_for_everyone()  # every node's local main process has written
    images = {name: torch.from_numpy(np.load(path, mmap_mode="c")) for name, path in files.items()}
    state.wait_for_everyone()  # every rank has mapped
    if state.is_local_main_process:
        for path in files.values():
            path.unlink(missing_ok=True)  # a node file system shared by nodes: another node's main may be first
    return images


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
    With several processes each node's local main process decodes, and the node's ranks map its
    result (:func:`share_on_node`): one decode and one copy in memory per node. With
    ``data.cache_dir`` the main process decodes and writes first while the others wait, then the
    other nodes' local main processes read its entries (only the main process writes there).
    """
    state = PartialState()
    sizes = {"train": working_size(cfg.image_size), "val": cfg.image_size}
    parts = {"train": [s.path for s in split.train], "val": [s.path for s in split.val]}
    shared = node_files(cfg, parts) if state.num_processes > 1 else None
    images, stats = {}, CacheStats()
    with state.main_process_first() if cfg.cache_dir is not None else contextlib.nullcontext():
        for name, paths in parts.items():
            if shared is not None and not state.is_local_main_process:
                continue  # the node's local main process decodes for it
            images[name], part_stats = decode_all(
                paths, sizes[name], cfg.alpha_background, cfg.num_workers, cfg.cache_dir, write=state.is_main_process
            )
            stats.decoded, stats.from_disk = stats.decoded + part_stats.decoded, stats.from_disk + part_stats.from_disk
            if shared is not None:
                _write_node_file(shared[name], images[name])
    if shared is not None:
        images = share_on_node(state, shared)
    stored = f", {stats.from_disk} read from {cfg.cache_dir}" if cfg.cache_dir is not None else ""
    megabytes = sum(t.numel() for t in images.values()) / 2**20
    where = "per node (decoded once by its local main process)" if shared is not None else "per process"
    logger.info(
        f"decoded-image cache: {len(parts['train'])} training images at {sizes['train']}px, {len(parts['val'])} "
        f"validation images at {sizes['val']}px, {megabytes:.1f} MiB {where}; {stats.decoded} decoded{stored}"
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


class Retargeted(Dataset):
    """A dataset's images with other per-sample targets (e.g. haemoglobin instead of the class)."""

    def __init__(self, dataset: Dataset, targets: torch.Tensor):
        if len(dataset) != len(targets):
            raise ValueError(f"{len(dataset)} images but {len(targets)} targets")
        self.dataset, self.targets = dataset, targets
        self.batch_transform = device_transform_of(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset[index][0], self.targets[index]


def make_loaders(
    cfg: Config,
    split: SplitData,
    pin_memory: bool,
    rank: int | None = None,
    targets: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[DataLoader, DataLoader]:
    """The training and validation loaders of ``data.pipeline``, before Accelerate shards them;
    ``rank`` (default: this process's) seeds the loader workers; ``targets`` (training,
    validation) replace the class labels."""
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
        require_shared_memory(train.images.numel() + val.images.numel(), workers)
    else:
        background = cfg.data.alpha_background
        train = ImageDataset(split.train, train_transform(cfg.data.image_size, *normalization), background)
        val = ImageDataset(split.val, eval_transform(cfg.data.image_size, *normalization), background)
    if targets is not None:
        train, val = Retargeted(train, targets[0]), Retargeted(val, targets[1])
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


SHARED_MEMORY = Path("/dev/shm")


def require_shared_memory(nbytes: int, workers: int) -> None:
    """Loader workers started by spawn or forkserver (not fork) receive the decoded cache through
    shared memory (``/dev/shm``): stop with what to do when it cannot hold it, instead of a bus
    error in a worker. Forked workers share the parent's pages and need none."""
    if workers == 0 or torch.multiprocessing.get_start_method() == "fork" or not SHARED_MEMORY.is_dir():
        return
    free = shutil.disk_usage(SHARED_MEMORY).free
    if free < nbytes:
        raise DataError(
            f"data.num_workers={workers}: loader workers started by {torch.multiprocessing.get_start_method()} "
            f"receive the decoded images ({nbytes / 2**30:.2f} GiB) through {SHARED_MEMORY}, which has "
            f"{free / 2**30:.2f} GiB free. Set data.num_workers=0 (the augmentation runs on the device anyway), "
            f"enlarge {SHARED_MEMORY} (docker run --shm-size), or start workers by fork"
        )


def device_transform_of(dataset: Dataset) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the training device does to a batch before the model: the cached pipeline's batched
    augmentation (or validation resize) and normalisation; PIL-pipeline batches arrive finished."""
    return getattr(dataset, "batch_transform", torch.nn.Identity())


def device_transform(loader: DataLoader) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`device_transform_of` the loader's dataset."""
    return device_transform_of(loader.dataset)
