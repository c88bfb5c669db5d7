"""How Accelerate shards the training order across ranks, and what of it the loop counts."""

from __future__ import annotations

from collections import Counter

import pytest
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, SequentialSampler

from anemia_dist.trainer import real_samples


@pytest.mark.parametrize("size", [1, 7, 15, 16, 17, 33])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_real_samples_marks_each_image_exactly_once_across_ranks(size, world):
    batch = 4
    counted, yielded = Counter(), 0
    for rank in range(world):
        shard = BatchSamplerShard(BatchSampler(SequentialSampler(range(size)), batch, False), world, rank)
        for step, indices in enumerate(shard):
            yielded += len(indices)
            counted.update(indices[: real_samples(step, rank, world, batch, size)])
    assert counted == Counter(range(size))
    if world > 1 and size % (batch * world):
        assert yielded > size, "negative control: even_batches did pad this epoch"
