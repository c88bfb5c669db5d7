"""The decoded-image cache on disk, shared by two ranks of a real training run."""

from __future__ import annotations

import json

import pytest
from helpers import TINY, check, launch, make_image_folder

from anemia_dist.run_dir import SUMMARY

pytestmark = pytest.mark.multiprocess


def test_two_ranks_share_the_disk_cache_the_main_process_wrote(tmp_path):
    data = make_image_folder(tmp_path / "data", {"anemic": 6, "non-anemic": 8})
    store = tmp_path / "cache"
    args = [
        "-m",
        "anemia_dist",
        "train",
        *TINY,
        f"data.root={data}",
        f"data.cache_dir={store}",
        f"run.output_dir={tmp_path / 'runs'}",
        "train.epochs=1",
    ]
    first = check(launch([*args, "run.name=first"]))
    assert "14 decoded, 0 read from" in first.stdout
    assert len(list(store.glob("*.npy"))) == 14 and not list(store.glob(".*"))
    second = check(launch([*args, "run.name=second"]))
    assert "0 decoded, 14 read from" in second.stdout
    summary = json.loads((tmp_path / "runs" / "second" / SUMMARY).read_text())
    assert summary["world_size"] == 2 and summary["epochs_run"] == 1
