"""The decoded-image cache on disk, shared by two ranks of a real training run, and the node
cache that lets a node's ranks share one decode."""

from __future__ import annotations

import hashlib
import json

import pytest
from helpers import TINY, check, launch, make_image_folder, script

from anemia_dist.config import load_config
from anemia_dist.datasets import make_loaders
from anemia_dist.run_dir import SUMMARY
from anemia_dist.splits import build_split_on_main

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


def test_two_ranks_on_a_node_share_one_decode_and_the_same_pixels(tmp_path):
    data = make_image_folder(tmp_path / "data", {"anemic": 6, "non-anemic": 6})
    out, node = tmp_path / "out", tmp_path / "node"
    out.mkdir()
    overrides = [*TINY, f"data.root={data}", f"data.node_cache_dir={node}"]
    check(launch([script("node_cache_probe.py"), str(out), *overrides]))
    ranks = [json.loads((out / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert [r["decoded"] for r in ranks] == [12, 0]  # one decode on the node, by its local main process
    assert ranks[0]["train"] == ranks[1]["train"] and ranks[0]["val"] == ranks[1]["val"]
    assert ranks[0]["shape"][0] < 12  # the training split, not the whole folder
    for rank in ranks:  # both map the node's two files (train, val), removed once both had mapped them
        assert [name.rsplit("-", 1)[-1] for name, _ in rank["maps"]] == ["train.npy", "val.npy"]
        assert all(deleted for _, deleted in rank["maps"])
        assert rank["left"] == []
    # the same pixels as one process decoding for itself
    cfg = load_config(None, overrides)
    train, _ = make_loaders(cfg, build_split_on_main(cfg.data, cfg.train.seed, True), pin_memory=False)
    assert hashlib.sha256(train.dataset.images.numpy().tobytes()).hexdigest() == ranks[0]["train"]
