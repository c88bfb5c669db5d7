"""Run under ``accelerate launch``: the real training loop, observed from inside every rank.

Usage: ``rank_spy.py OUT_DIR [--no-rewrap] -- key=value ...``. Each rank writes
``OUT_DIR/rank<k>.json`` with, per epoch, the validation loss it computed, a hash of its
last-stage (ResNet: layer4) weights and its own metrics row (lr, unfrozen stages); the summary
``train`` returned on it; and every file-system write it made under the run directory (recorded
with a Python audit hook). Only this spy writes to OUT_DIR. With ``train.mixed_precision=fp16``
it gives the CPU run torch's CPU GradScaler, as a GPU run has one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

import anemia_dist.trainer as trainer
from anemia_dist.config import load_config
from anemia_dist.model import backbone_stages, resolve_stages
from anemia_dist.tasks import ClassifyTask

WRITE_EVENTS = {"os.rename", "os.replace", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"}


def main() -> None:
    out = Path(sys.argv[1])
    flags = sys.argv[2 : sys.argv.index("--")]
    overrides = sys.argv[sys.argv.index("--") + 1 :]
    cfg = load_config(None, overrides)
    run_dir = str(Path(cfg.run.output_dir).resolve())
    rank = int(os.environ.get("RANK", "0"))
    writes: list[str] = []

    def audit(event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
            target = os.path.abspath(os.fsdecode(args[0]))
            if target.startswith(run_dir) and any(c in mode for c in "wax+"):
                writes.append(f"open:{target}")
        elif event in WRITE_EVENTS and args:
            target = os.path.abspath(os.fsdecode(args[0])) if isinstance(args[0], (str, bytes, os.PathLike)) else ""
            if target.startswith(run_dir):
                writes.append(f"{event}:{target}")

    sys.addaudithook(audit)
    real_save = torch.save

    def recorded_save(obj, f, *args, **kwargs):  # torch.save opens its file in C++: no audit event
        if isinstance(f, (str, os.PathLike)) and os.path.abspath(f).startswith(run_dir):
            writes.append(f"torch.save:{os.path.abspath(f)}")
        return real_save(obj, f, *args, **kwargs)

    torch.save = recorded_save

    epochs: list[dict] = []
    real_validate = ClassifyTask.validate

    def spying_validate(task, accelerator, model, loader, class_weights):
        result = real_validate(task, accelerator, model, loader, class_weights)
        inner = accelerator.unwrap_model(model)
        last = backbone_stages(inner)[resolve_stages(inner, ["last"])[0]]  # ResNet: layer4
        digest = hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes() for t in last)).hexdigest()
        epochs.append({"val_loss": result.loss, "last_stage": digest})
        return result

    ClassifyTask.validate = spying_validate
    rows: list[dict] = []
    real_metrics_row = trainer.metrics_row

    def spying_metrics_row(*args, **kwargs):  # computed on every rank: this rank's decisions
        row = real_metrics_row(*args, **kwargs)
        rows.append({key: row[key] for key in ("epoch", "lr", "unfrozen", "val_loss", "train_images")})
        return row

    trainer.metrics_row = spying_metrics_row
    if "--no-rewrap" in flags:  # negative control: show the test catches unsynchronised layers
        trainer.rewrap_after_unfreeze = lambda accelerator, model: model

    if cfg.train.mixed_precision == "fp16":  # on CPU Accelerate makes no GradScaler; a GPU run has one
        make_accelerator = trainer.make_accelerator

        def with_cpu_scaler(config):
            accelerator = make_accelerator(config)
            accelerator.scaler, accelerator.native_amp = torch.amp.GradScaler("cpu"), True
            return accelerator

        trainer.make_accelerator = with_cpu_scaler
    summary = trainer.train(cfg)
    report = {"rank": rank, "epochs": epochs, "rows": rows, "summary": summary, "writes": writes}
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
