"""Run under ``accelerate launch``: rank 1 sees a stale listing of the run directory; every rank
must still follow the main process's resume decisions.

Usage: ``stale_listing.py OUT_DIR CLASSES -- key=value ...`` (CLASSES comma-separated). Rank 1
sees no checkpoints, no ``metrics.jsonl`` and a ``checkpoint.json`` saying "not unfrozen". Each
rank writes ``OUT_DIR/rank<k>.json``: the checkpoint it would resume and whether it would unfreeze
first, and whether it refused to start over an existing run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anemia_dist.checkpointing as checkpointing
import anemia_dist.trainer as trainer
from anemia_dist.config import load_config
from anemia_dist.errors import ConfigError
from anemia_dist.run_dir import RunDirectory


def main() -> None:
    out, classes = Path(sys.argv[1]), sys.argv[2].split(",")
    cfg = load_config(None, sys.argv[sys.argv.index("--") + 1 :])
    accelerator = trainer.make_accelerator(cfg)
    run = RunDirectory(Path(cfg.run.output_dir) / cfg.run.name, writes=False)
    if accelerator.process_index == 1:  # the stale view
        checkpointing.complete_checkpoints = lambda directory: []
        real_read_info = checkpointing.read_info
        checkpointing.read_info = lambda path: (
            real_read_info(path) | {"progress": real_read_info(path)["progress"] | {"unfrozen": False}}
        )
        run.has_metrics = lambda: False
    checkpointer = checkpointing.Checkpointer(accelerator, run.path, cfg, classes)
    resume = checkpointer.resume_point()
    report = {"resume": str(resume), "unfrozen": checkpointer.resume_info.get("progress", {}).get("unfrozen")}
    cfg.run.resume = None  # as if started without run.resume over this run
    try:
        trainer.refuse_existing_run(cfg, run)
        report["refused"] = False
    except ConfigError:
        report["refused"] = True
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(report))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
