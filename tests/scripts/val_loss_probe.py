"""Run under ``accelerate launch``: validation loss (and, for model.task=regress, MAE) of one fixed
initial model, on every rank.

Usage: ``val_loss_probe.py OUT_DIR -- key=value ...``; each rank writes ``OUT_DIR/rank<k>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from accelerate.utils import set_seed

from anemia_dist.config import load_config
from anemia_dist.datasets import make_loaders
from anemia_dist.model import build_model, freeze_backbone
from anemia_dist.splits import balanced_class_weights, build_split
from anemia_dist.tasks import make_task
from anemia_dist.trainer import make_accelerator


def main() -> None:
    out = Path(sys.argv[1])
    cfg = load_config(None, sys.argv[sys.argv.index("--") + 1 :])
    accelerator = make_accelerator(cfg)
    set_seed(cfg.train.seed)
    split = build_split(cfg.data, cfg.train.seed)
    weights = balanced_class_weights(split.train, len(split.classes)).to(accelerator.device)
    task = make_task(cfg, split)
    _, val_loader = make_loaders(cfg, split, pin_memory=False, targets=task.targets(split))
    model = build_model(cfg.model, task.outputs())
    freeze_backbone(model)
    model, val_loader = accelerator.prepare(model, val_loader)
    result = task.validate(accelerator, model, val_loader, weights)
    report = {"val_loss": result.loss, "n": len(result.labels), "val_acc": result.accuracy}
    if cfg.model.task == "regress":
        report["val_mae"] = task.epoch_metrics(result)[1]["mae"]
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
