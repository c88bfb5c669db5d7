"""A haemoglobin checkpoint exports to one file that outputs predict's Hb (TorchScript, no training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from helpers import TINY, write_image

from anemia_dist.checkpointing import Checkpointer
from anemia_dist.config import load_config
from anemia_dist.errors import ConfigError
from anemia_dist.export import export, portable_model, predict_pixels, runner
from anemia_dist.hb_evaluation import predict_hb
from anemia_dist.model import build_model
from anemia_dist.run_dir import BEST
from anemia_dist.sources import Sample
from anemia_dist.tasks import HbPoint, HbScale


def regression_best(root: Path) -> Path:
    """best/ as a regression run writes it (the trainer's Checkpointer), random weights."""
    torch.manual_seed(0)
    cfg = load_config(None, [*TINY, "model.task=regress", "data.measure_column=hb", "data.threshold=11"])
    model = build_model(cfg.model, 1, cfg.data.image_size)
    point = HbPoint(HbScale(11.5, 1.6), "anemic", 1.2, -2.0, 0.9, 1.5, threshold=11.0)
    Checkpointer(Accelerator(), root, cfg, ["anemic", "non-anemic"]).save_best(model, 1, 0.5, 0.5, point)
    return root / BEST


def test_the_exported_file_outputs_predicts_haemoglobin(tmp_path):
    best = regression_best(tmp_path / "run")
    images = []
    for i, colour in enumerate([(230, 160, 160), (190, 60, 60), (170, 40, 50)]):
        images.append(tmp_path / f"eye{i}.png")
        write_image(images[-1], colour, size=40, seed=i)
    rows = predict_hb(best, images, num_workers=0)
    result = export(best, "torchscript", tmp_path / "hb.pt")
    assert result["self_check_max_abs_diff"] < 1e-4
    _, metadata = portable_model(best)
    assert metadata["output_name"] == "hb" and metadata["task"] == "regress"
    assert json.loads(metadata["hb_sd"]) == 1.6 and json.loads(metadata["calibration"])["slope"] == 1.2
    pixels = predict_pixels([Sample(str(p), 0, str(p)) for p in images], metadata)
    with torch.no_grad():
        exported = runner(tmp_path / "hb.pt", "torchscript")(pixels)
    assert exported == pytest.approx(np.array([float(r["hb"]) for r in rows]), abs=2e-3)
    assert len({round(float(r["hb"]), 3) for r in rows}) == 3  # negative control: the images differ
    assert [r["anemic"] for r in rows] == [int(float(r["hb"]) < 11) for r in rows]


def test_int8_export_of_a_regression_checkpoint_is_refused(tmp_path):
    pytest.importorskip("onnxruntime")
    best = regression_best(tmp_path / "run")
    with pytest.raises(ConfigError, match="--quantize"):
        export(best, "onnx", tmp_path / "hb.onnx", quantized=True)
