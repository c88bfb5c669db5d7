"""Run under ``accelerate launch``: the decoded-image cache as each rank builds it.

Usage: ``node_cache_probe.py OUT_DIR key=value ...``. Each rank writes ``OUT_DIR/rank<k>.json``:
how many images it decoded itself, a hash of its training and validation pixels, whether its
arrays are maps of the node files, and which node cache files were left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from accelerate import PartialState

import anemia_dist.datasets as datasets
from anemia_dist.config import load_config
from anemia_dist.splits import build_split_on_main
from anemia_dist.trainer import make_accelerator


def main() -> None:
    out, cfg = Path(sys.argv[1]), load_config(None, sys.argv[2:])
    make_accelerator(cfg)  # as training starts: the process group, then PartialState() shares it
    state = PartialState()
    decoded = []
    real_decode = datasets.decode
    datasets.decode = lambda path, *args: decoded.append(path) or real_decode(path, *args)
    split = build_split_on_main(cfg.data, cfg.train.seed, state.is_main_process)
    train, val = (loader.dataset for loader in datasets.make_loaders(cfg, split, pin_memory=False))
    state.wait_for_everyone()
    report = {
        "decoded": len(decoded),
        "processes": state.num_processes,
        "local_main": state.is_local_main_process,
        "train": hashlib.sha256(train.images.numpy().tobytes()).hexdigest(),
        "val": hashlib.sha256(val.images.numpy().tobytes()).hexdigest(),
        "shape": list(train.images.shape),
        # the maps of this process: the node files, mapped and already removed ("(deleted)")
        "maps": sorted(
            {
                (Path(line.split()[5]).name, line.rstrip().endswith("(deleted)"))
                for line in Path("/proc/self/maps").read_text().splitlines()
                if "anemia-dist-" in line
            }
        ),
        "left": sorted(p.name for p in Path(cfg.data.node_cache_dir).glob("anemia-dist-*")),
    }
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
