"""The decoded-image cache: each image decoded once, in memory and optionally on disk."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, make_image_folder
from PIL import Image
from torch.utils.data import DataLoader

from anemia_dist import datasets
from anemia_dist.batch_augment import EvalResize, TrainAugment
from anemia_dist.config import load_config
from anemia_dist.datasets import CachedImages, ImageDataset, decode, decode_all, device_transform, make_loaders
from anemia_dist.errors import DataError
from anemia_dist.images import load_rgb, working_size
from anemia_dist.inference import model_inputs
from anemia_dist.splits import build_split
from anemia_dist.transforms import eval_transform

BACKGROUND = (124, 116, 104)


def photo(path: Path, size: tuple[int, int], seed: int = 0, exif_orientation: int | None = None) -> Path:
    """A JPEG with smooth content (like a photo, unlike noise)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    image = coarse.resize(size, Image.Resampling.BICUBIC)
    exif = Image.Exif()
    if exif_orientation is not None:
        exif[0x0112] = exif_orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=92, exif=exif)
    return path


def counting_decoder(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = datasets.load_rgb

    def counted(path, background, min_side=None):
        calls.append(str(path))
        return real(path, background, min_side=min_side)

    monkeypatch.setattr(datasets, "load_rgb", counted)
    return calls


def test_jpegs_decode_at_a_reduced_scale_after_exif_orientation(tmp_path):
    # Stored 1600x1200 with orientation 6 (rotate 90°): the picture is 1200 wide, 1600 tall.
    path = photo(tmp_path / "phone.jpg", (1600, 1200), exif_orientation=6)
    full = load_rgb(path, BACKGROUND)
    reduced = load_rgb(path, BACKGROUND, min_side=280)
    assert full.size == (1200, 1600)
    assert reduced.size == (300, 400), "1/4 DCT scale: the largest reduction keeping both sides >= 280"
    shrunk_full = np.asarray(full.resize(reduced.size, Image.Resampling.BILINEAR), dtype=np.float64)
    assert np.abs(np.asarray(reduced, dtype=np.float64) - shrunk_full).mean() < 3.0, "same picture, same orientation"


def test_cached_image_is_the_pil_pipeline_decode_resized_to_the_working_size(tmp_path, cp_anemic):
    # Real RGBA crops: the alpha mask must be composited onto the background, as load_rgb does.
    path = next((cp_anemic / "Anemic").glob("*.png"))
    size = working_size(224)
    expected = np.asarray(load_rgb(path, BACKGROUND).resize((size, size), Image.Resampling.BILINEAR))
    cached = decode(path, size, BACKGROUND)
    assert cached.dtype == torch.uint8 and cached.shape == (3, size, size)
    assert np.array_equal(cached.permute(1, 2, 0).numpy(), expected)


def test_each_image_is_decoded_once_however_many_epochs_read_it(tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "data", {"a": 3, "b": 3})
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    calls = counting_decoder(monkeypatch)
    images, stats = decode_all(paths, 39, BACKGROUND)
    dataset = CachedImages(images, [0, 0, 0, 1, 1, 1], TrainAugment(32))
    loader = DataLoader(dataset, batch_size=4, shuffle=True)
    for _epoch in range(3):
        for batch, _labels in loader:
            assert batch.dtype == torch.uint8 and batch.shape[1:] == (3, 39, 39)
    assert sorted(calls) == paths
    assert stats.decoded == 6 and stats.from_disk == 0 and stats.written == 0


def test_loader_workers_decode_and_serve_the_same_pixels(tmp_path):
    folder = make_image_folder(tmp_path / "data", {"a": 3, "b": 2})
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    in_process, _ = decode_all(paths, 39, BACKGROUND, num_workers=0)
    in_workers, stats = decode_all(paths, 39, BACKGROUND, num_workers=2)
    assert torch.equal(in_process, in_workers) and stats.decoded == 5
    dataset = CachedImages(in_process, [0, 0, 0, 1, 1], TrainAugment(32))
    served = torch.cat([images for images, _ in DataLoader(dataset, batch_size=2, num_workers=2)])
    assert torch.equal(served, in_process)


def test_disk_cache_hit_skips_decoding_and_a_changed_file_is_decoded_again(tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "data", {"a": 3, "b": 3})
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    store = tmp_path / "cache"
    first, stats = decode_all(paths, 39, BACKGROUND, cache_dir=store)
    assert (stats.decoded, stats.written, stats.from_disk) == (6, 6, 0)
    assert len(list(store.glob("*.npy"))) == 6

    calls = counting_decoder(monkeypatch)
    second, stats = decode_all(paths, 39, BACKGROUND, cache_dir=store)
    assert calls == [] and (stats.decoded, stats.from_disk) == (0, 6)
    assert torch.equal(first, second)

    photo(Path(paths[0]).with_suffix(".png"), (30, 20), seed=7)  # new content under the same name
    third, stats = decode_all(paths, 39, BACKGROUND, cache_dir=store)
    assert calls == [paths[0]] and (stats.decoded, stats.from_disk) == (1, 5)
    assert not torch.equal(third[0], first[0]) and torch.equal(third[1:], first[1:])

    # Another working size or background is another key: nothing stale is served.
    calls.clear()
    decode_all(paths[:2], 40, BACKGROUND, cache_dir=store)
    decode_all(paths[:2], 39, (0, 0, 0), cache_dir=store)
    assert len(calls) == 4


def test_a_reader_that_may_not_write_leaves_the_cache_folder_alone(tmp_path):
    folder = make_image_folder(tmp_path / "data", {"a": 2, "b": 2})
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    store = tmp_path / "cache"
    _, stats = decode_all(paths, 39, BACKGROUND, cache_dir=store, write=False)
    assert stats.decoded == 4 and stats.written == 0 and not store.exists()


def test_a_corrupt_cache_entry_is_decoded_again_not_served(tmp_path):
    folder = make_image_folder(tmp_path / "data", {"a": 1, "b": 1})
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    store = tmp_path / "cache"
    first, _ = decode_all(paths, 39, BACKGROUND, cache_dir=store)
    entry = sorted(store.glob("*.npy"))[0]
    entry.write_bytes(entry.read_bytes()[:100])
    second, stats = decode_all(paths, 39, BACKGROUND, cache_dir=store)
    assert stats.decoded == 1 and torch.equal(first, second)


def test_an_undecodable_file_is_named_in_the_error(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        decode_all([str(bad)], 39, BACKGROUND)


def split_and_config(tmp_path: Path, *overrides: str):
    data = make_image_folder(tmp_path / "data", {"anemic": 6, "non-anemic": 8})
    cfg = load_config(None, [*TINY, f"data.root={data}", *overrides])
    return cfg, build_split(cfg.data, cfg.train.seed)


def test_gpu_pipeline_loaders_serve_cached_uint8_batches_finished_on_the_device(tmp_path):
    cfg, split = split_and_config(tmp_path)
    train, val = make_loaders(cfg, split, pin_memory=False)
    assert isinstance(train.dataset, CachedImages) and isinstance(val.dataset, CachedImages)
    assert train.dataset.images.data_ptr() != val.dataset.images.data_ptr()
    assert len(train.dataset) == len(split.train) and len(val.dataset) == len(split.val)
    assert isinstance(device_transform(train), TrainAugment) and isinstance(device_transform(val), EvalResize)
    assert next(iter(train))[0].shape[-1] == working_size(32)  # room for the augmentation's zoom
    images, labels = next(iter(val))
    assert images.dtype == torch.uint8 and images.shape[-1] == 32  # validation: straight at the size
    finished = device_transform(val)(images)
    assert finished.shape == (len(images), 3, 32, 32) and finished.dtype == torch.float32
    assert torch.equal(labels, torch.tensor([s.label for s in split.val[: len(labels)]]))


def test_cached_validation_inputs_equal_the_pil_eval_transform_on_pngs(tmp_path):
    cfg, split = split_and_config(tmp_path)
    _, val = make_loaders(cfg, split, pin_memory=False)
    cached = torch.cat([device_transform(val)(images) for images, _ in val])
    reference = ImageDataset(split.val, eval_transform(32), cfg.data.alpha_background)
    assert torch.allclose(cached, torch.stack([reference[i][0] for i in range(len(reference))]), atol=1e-5)


def test_evaluate_and_predict_inputs_are_the_pixels_training_validated_on(tmp_path):
    """The threshold saved at training must meet the same scores at evaluation: same pixels, also
    for JPEGs far above the training size, which both decode at a reduced DCT scale."""
    data = make_image_folder(tmp_path / "data", {"anemic": 4, "non-anemic": 4})
    for name, seed in (("anemic", 1), ("non-anemic", 2)):
        coarse = np.random.default_rng(seed).integers(0, 255, (5, 7, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((448, 320), Image.Resampling.BICUBIC).save(data / name / "photo.jpg", quality=85)
    cfg = load_config(None, [*TINY, f"data.root={data}"])
    split = build_split(cfg.data, cfg.train.seed)
    everything = dataclasses.replace(split, val=split.train + split.val)  # validate on every file
    _, val = make_loaders(cfg, everything, pin_memory=False)
    validated = torch.cat([images for images, _ in val])
    meta = {"image_size": 32, "alpha_background": cfg.data.alpha_background}
    inputs = model_inputs(everything.val, meta)
    evaluated = torch.stack([inputs[i][0] for i in range(len(inputs))])
    assert torch.equal(validated, evaluated) and validated.dtype == torch.uint8
    assert device_transform(val).__class__ is inputs.batch_transform.__class__ is EvalResize
    # A negative control: the PIL pipeline's full-resolution decode gives other pixels for the photos.
    photos = [i for i, s in enumerate(everything.val) if s.path.endswith(".jpg")]
    pil_eval = ImageDataset([everything.val[i] for i in photos], eval_transform(32), cfg.data.alpha_background)
    full = torch.stack([pil_eval[k][0] for k in range(len(photos))])
    assert len(photos) == 2 and not torch.allclose(EvalResize(32)(evaluated[photos]), full, atol=1e-3)


def test_pil_pipeline_keeps_the_per_image_pil_datasets(tmp_path):
    cfg, split = split_and_config(tmp_path, "data.pipeline=pil")
    train, val = make_loaders(cfg, split, pin_memory=False)
    assert isinstance(train.dataset, ImageDataset) and isinstance(val.dataset, ImageDataset)
    images, _ = next(iter(train))
    assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
    assert torch.equal(device_transform(train)(images), images)


def pil_batches(cfg, split, rank: int) -> list[torch.Tensor]:
    train, _ = make_loaders(cfg, split, pin_memory=False, rank=rank)
    return [images for images, _ in train]


def test_pil_loader_workers_draw_their_own_augmentation_per_rank_reproducibly(tmp_path):
    """The ranks shuffle alike (Accelerate then shards that order) but augment differently."""
    cfg, split = split_and_config(tmp_path, "data.pipeline=pil", "data.num_workers=1")
    rank0, again, rank1 = pil_batches(cfg, split, 0), pil_batches(cfg, split, 0), pil_batches(cfg, split, 1)
    assert all(torch.equal(a, b) for a, b in zip(rank0, again, strict=True)), "a fixed seed reproduces the stream"
    assert not any(torch.equal(a, b) for a, b in zip(rank0, rank1, strict=True)), "rank 1 draws its own"
