"""The CUDA-only failure modes of issue 18, pinned on the CPU: collective timeouts, read-backs
that stall the device, blocking copies, precision disagreements, determinism and recompiles."""

from __future__ import annotations

from datetime import timedelta

import pytest

from anemia_dist.config import load_config
from anemia_dist.distributed import collective_timeout
from anemia_dist.errors import ConfigError
from anemia_dist.trainer import make_accelerator


def test_the_accelerator_is_built_with_the_configured_collective_timeout():
    cfg = load_config("demo", ["train.collective_timeout_minutes=90"])
    accelerator = make_accelerator(cfg)
    assert accelerator.init_handler is not None
    assert accelerator.init_handler.to_kwargs() == {"timeout": timedelta(minutes=90)}


def test_the_default_collective_timeout_is_longer_than_nccls_ten_minutes():
    default = load_config("demo", []).train.collective_timeout_minutes
    assert collective_timeout(default).timeout > timedelta(minutes=10)


def test_a_non_positive_collective_timeout_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="train.collective_timeout_minutes"):
        load_config("demo", ["train.collective_timeout_minutes=0"])
