"""Grad-CAM overlays: ``predict --explain`` writes one per scored photo at its own size without
EXIF, and the maps agree with pytorch-grad-cam's. (Where the maps land on a trained model:
``tests/multiprocess/test_explain_training.py``.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_best, read_csv, write_image
from PIL import Image

from anemia_dist.cli import main
from anemia_dist.config import ModelConfig
from anemia_dist.explain import grad_cam, heat_at, overlay_names
from anemia_dist.model import build_model
from anemia_dist.run_dir import BEST


def test_predict_explain_writes_an_overlay_per_scored_photo_at_its_size_without_exif(tmp_path):
    best = make_best(tmp_path / BEST, ["anemic", "non-anemic"])
    photos = tmp_path / "photos"
    write_image(photos / "a" / "eye.png", (200, 60, 60), size=40)
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"  # Make
    exif[0x0112] = 6  # Orientation: rotated, so the photo as seen is 30 wide and 50 high
    rng = np.random.default_rng(1)
    picture = Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8))
    (photos / "b").mkdir()
    picture.save(photos / "b" / "eye.jpg", exif=exif)
    Image.new("RGB", (1, 1)).save(photos / "dot.png")  # rejected: no overlay
    out, maps = tmp_path / "preds.csv", tmp_path / "maps"
    args = ["predict", "--checkpoint", str(best), str(photos), "--out", str(out), "--num-workers", "0"]
    assert main([*args, "--explain", str(maps)]) == 0
    rows = {r["path"].rsplit("/", 2)[-2] + "/" + r["path"].rsplit("/", 1)[-1]: r for r in read_csv(out)}
    assert rows["photos/dot.png"]["heatmap"] == ""
    sizes = {"a/eye.png": (40, 40), "b/eye.jpg": (30, 50)}
    written = set()
    for name, size in sizes.items():
        heatmap = rows[name]["heatmap"]
        with Image.open(heatmap) as image:
            assert image.format == "PNG" and image.size == size and image.mode == "RGB"
            assert not image.getexif() and "exif" not in image.info
        written.add(heatmap)
    assert len(written) == 2 and sorted(p.name for p in maps.iterdir()) == ["eye-2.png", "eye.png"]


def test_overlay_names_stay_unique():
    assert overlay_names(["x/a.jpg", "y/a.png", "a-2.png", "z/a.heic"]) == ["a.png", "a-2.png", "a-2-2.png", "a-3.png"]


def test_heat_puts_each_cell_over_the_pixels_it_is_centred_on():
    """ResNet cell i is centred on input pixel 32·i: a one-hot cell peaks there, not half a cell later."""
    cam = np.zeros((4, 4))
    cam[1, 2] = 1.0
    heat = heat_at(cam, (128, 128))
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert abs(y - 32) <= 1 and abs(x - 64) <= 1
    assert heat[:, 0].max() == 0.0 and heat.max() <= 1.0


def test_grad_cam_cell_maps_agree_with_pytorch_grad_cam():
    pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.image import scale_cam_image

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18", weights="none", hidden=16, dropout=0.0), 2).eval()
    inputs = torch.randn(3, 3, 128, 128)
    called = torch.tensor([True, False, True])
    ours = grad_cam(model, inputs, 1, called)
    assert ours.shape == (3, 4, 4) and float(ours.amin()) == 0.0 and float(ours.amax()) == pytest.approx(1.0, abs=1e-5)

    def log_odds(decided_positive):
        return lambda output: (output[1] - output[0]) * (1 if decided_positive else -1)

    targets = [log_odds(bool(c)) for c in called]
    with pytorch_grad_cam.GradCAM(model=model, target_layers=[model.layer4]) as cam:
        cam(input_tensor=inputs, targets=targets)  # records layer4's activations and gradients
        recorded = cam.activations_and_grads
        activations, gradients = (t[0].cpu().numpy() for t in (recorded.activations, recorded.gradients))
        cells = cam.get_cam_image(inputs, model.layer4, targets, activations, gradients)
    # the library's own steps before its OpenCV resize: ReLU, then min-max per image
    theirs = scale_cam_image(np.maximum(cells, 0))
    assert np.abs(ours.numpy() - theirs).max() < 1e-5
