"""Which checkpoint a run resumes, and the ones it refuses before anything is written."""

from __future__ import annotations

import pytest
from accelerate import Accelerator
from helpers import TINY, fake_checkpoint

from anemia_dist.checkpointing import Checkpointer
from anemia_dist.config import load_config
from anemia_dist.errors import CheckpointMismatch
from anemia_dist.run_dir import CHECKPOINTS

CLASSES = ["anemic", "non-anemic"]


def checkpointer(run, resume: str = "auto") -> Checkpointer:
    cfg = load_config(None, [*TINY, f"run.resume={resume}"])
    return Checkpointer(Accelerator(), run, cfg, CLASSES)


def test_a_mid_epoch_checkpoint_of_another_world_size_is_refused_naming_the_epoch_checkpoint(tmp_path):
    identity = checkpointer(tmp_path).identity
    epoch = fake_checkpoint(tmp_path / CHECKPOINTS / "epoch-0003", identity, 3, unfrozen=True, world=2)
    fake_checkpoint(tmp_path / CHECKPOINTS / "epoch-0003-step-000005", identity, 3, True, step=5, world=2)
    with pytest.raises(CheckpointMismatch, match="written by 2 processes cannot continue its epoch on 1") as error:
        checkpointer(tmp_path).resume_point()
    assert f"run.resume={epoch}" in str(error.value)
    assert checkpointer(tmp_path, str(epoch)).resume_point() == epoch, "epoch checkpoints resume at any world size"


def test_a_mid_epoch_checkpoint_of_the_same_world_size_resumes(tmp_path):
    identity = checkpointer(tmp_path).identity
    mid = fake_checkpoint(tmp_path / CHECKPOINTS / "epoch-0001-step-000002", identity, 1, False, step=2, world=1)
    chooser = checkpointer(tmp_path)
    assert chooser.resume_point() == mid
    assert chooser.resume_info["progress"]["step"] == 2
