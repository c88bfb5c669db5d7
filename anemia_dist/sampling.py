"""Class-balanced sampling (``train.sampler=balanced``): each epoch one weighted draw, with
replacement, in which every class is equally likely; the alternative to class-weighted loss.

The draw is global: it depends on the seed and the epoch only, never on the rank or the global
random state, so every rank computes the same one and Accelerate hands each rank its own batches
of it (batch ``b`` to rank ``b mod world``, as for the shuffled sampler): no slot of the draw is
trained by two ranks, and a mid-epoch resume (``skip_first_batches`` after ``set_epoch``) continues
the same draw.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


class BalancedSampler(Sampler[int]):
    """``len(labels)`` indices per epoch, drawn with probability 1 / (k * count(class)) each."""

    def __init__(self, labels: Sequence[int], seed: int):
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        counts = torch.bincount(self.labels).double()
        present = int((counts > 0).sum())
        self.weights = 1.0 / (counts[self.labels] * present)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[int]:
        seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, np.uint64)[0])
        generator = torch.Generator().manual_seed(seed)
        draw = torch.multinomial(self.weights, len(self.labels), replacement=True, generator=generator)
        return iter(draw.tolist())
