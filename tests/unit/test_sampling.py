"""``train.sampler=balanced`` on 2 ranks, through Accelerate's own sharding of the loader (what
``accelerator.prepare`` does on each rank): balanced classes, each slot of the global draw on one
rank only, the same draw for a seed and epoch, and a mid-epoch resume that continues it."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from torch.utils.data import DataLoader, TensorDataset

from anemia_dist.config import load_config
from anemia_dist.datasets import make_loaders
from anemia_dist.sampling import BalancedSampler
from anemia_dist.sources import Sample
from anemia_dist.splits import SplitData

LABELS = [0] * 300 + [1] * 60  # 5:1, as anemic/non-anemic sets often are
BATCH, WORLD = 6, 2
PIL = ["data.pipeline=pil", "data.num_workers=0"]


def rank_loaders(sampler: BalancedSampler | None, epoch: int) -> list:
    """Each rank's loader as ``accelerator.prepare`` would shard it; items are dataset indices."""
    dataset = TensorDataset(torch.arange(len(LABELS)))
    loaders = []
    for rank in range(WORLD):
        loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, shuffle=sampler is None)
        sharded = prepare_data_loader(
            loader, num_processes=WORLD, process_index=rank, put_on_device=False, use_seedable_sampler=True
        )
        sharded.set_epoch(epoch)
        loaders.append(sharded)
    return loaders


def batches(loader) -> list[list[int]]:
    return [batch[0].tolist() for batch in loader]


def test_each_rank_trains_its_own_slots_of_one_global_draw():
    sampler = BalancedSampler(LABELS, seed=7)
    rank0, rank1 = (batches(loader) for loader in rank_loaders(sampler, epoch=3))
    sampler.set_epoch(3)
    draw = list(sampler)
    assert len(rank0) == len(rank1) == len(LABELS) // (BATCH * WORLD)
    # batch b of the draw goes to rank b mod 2: interleaved, the ranks' batches are the draw, each slot once
    interleaved = [i for pair in zip(rank0, rank1, strict=True) for batch in pair for i in batch]
    assert interleaved == draw
    assert len(set(draw)) < len(draw)  # with replacement: an image may fill two slots, a slot never two ranks


def test_the_classes_are_balanced_within_sampling_error_every_epoch():
    sampler = BalancedSampler(LABELS, seed=7)
    labels = torch.tensor(LABELS)
    for epoch in range(1, 21):
        drawn = [i for loader in rank_loaders(sampler, epoch) for batch in batches(loader) for i in batch]
        share = labels[drawn].float().mean().item()
        assert abs(share - 0.5) < 4 * (0.25 / len(drawn)) ** 0.5, (epoch, share)
    # negative control: the shuffled sampler keeps the 1:5 ratio
    shuffled = [i for loader in rank_loaders(None, 1) for batch in batches(loader) for i in batch]
    assert labels[shuffled].float().mean().item() == pytest.approx(60 / 360)


def test_the_draw_depends_on_seed_and_epoch_only():
    def draw(seed: int, epoch: int) -> list[int]:
        sampler = BalancedSampler(LABELS, seed)
        sampler.set_epoch(epoch)
        torch.manual_seed(epoch * 31 + seed)  # the global random state plays no part
        return list(sampler)

    assert draw(7, 2) == draw(7, 2)
    assert draw(7, 2) != draw(7, 3) and draw(7, 2) != draw(8, 2)


def test_a_mid_epoch_resume_continues_the_same_draw():
    sampler = BalancedSampler(LABELS, seed=7)
    full = [batches(loader) for loader in rank_loaders(sampler, epoch=5)]
    resumed_sampler = BalancedSampler(LABELS, seed=7)  # a fresh process after the preemption
    for rank, loader in enumerate(rank_loaders(resumed_sampler, epoch=5)):
        assert batches(skip_first_batches(loader, 4)) == full[rank][4:]


def test_the_training_loader_uses_it_when_asked(tmp_path: Path):
    samples = [Sample(str(tmp_path / f"{i}.png"), label, str(i)) for i, label in enumerate(LABELS[:12])]
    split = SplitData(train=samples, val=samples[:2], classes=["a", "b"], audit=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # balanced sampling with unweighted loss: no double-correction warning
        cfg = load_config(None, [*PIL, "train.sampler=balanced", "train.class_weights=none"])
    train, _ = make_loaders(cfg, split, pin_memory=False)
    assert isinstance(train.sampler, BalancedSampler)
    default, _ = make_loaders(load_config(None, PIL), split, pin_memory=False)
    assert isinstance(default.sampler, torch.utils.data.RandomSampler)
    with pytest.warns(UserWarning, match="twice"):
        load_config(None, ["train.sampler=balanced"])
