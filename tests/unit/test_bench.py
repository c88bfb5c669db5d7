"""``anemia-dist bench`` in process, and the phase-1 habit it measures: no graph through the frozen
backbone. (The bench as a command, compiling and the host-device traffic of real training steps:
``tests/multiprocess/test_bench_runs.py``.)"""

from __future__ import annotations

import torch
from helpers import TINY_BENCH, make_image_folder, phase_step
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from anemia_dist.bench import default_precision, make_photos, synchronizer, warmup_batches
from anemia_dist.bench import run_bench as run_bench_in_process
from anemia_dist.cli import build_parser
from anemia_dist.config import ModelConfig
from anemia_dist.model import build_model, freeze_backbone, optimizer_param_groups, unfreeze


def test_generated_photos_are_jpegs_of_the_requested_size(tmp_path):
    samples = make_photos(tmp_path, 2, (640, 480), seed=0)
    for sample in samples:
        with Image.open(sample.path) as image:
            assert (image.format, image.size) == ("JPEG", (640, 480))


def test_bench_on_given_images_uses_them_as_one_set(tmp_path):
    folder = make_image_folder(tmp_path / "mine", {"a": 3, "b": 2})
    args = build_parser().parse_args(["bench", *TINY_BENCH, "--data", str(folder), "--e2e-steps", "0"])
    results = run_bench_in_process(args)
    assert [(r["set"], r["images"]) for r in results["data"]] == [("mine", 5)]
    assert results["end_to_end"] == []


def test_phase_one_builds_no_autograd_graph_through_the_frozen_backbone():
    # Frozen weights and an input without grad: autograd records nothing before the head, so the
    # backbone's activations are freed as it goes; after the unfreeze the graph starts at layer4.
    model = build_model(ModelConfig(arch="resnet18", weights="none", hidden=16), 2)
    freeze_backbone(model)
    optimizer = torch.optim.Adam(optimizer_param_groups(model, ["layer4"]), lr=1e-3)
    seen: dict[str, bool] = {}
    for name in ("layer3", "layer4"):
        getattr(model, name).register_forward_hook(
            lambda m, i, out, name=name: seen.__setitem__(name, out.requires_grad)
        )
    phase_step(model, optimizer)
    assert seen == {"layer3": False, "layer4": False}
    unfreeze(model, ["layer4"])
    phase_step(model, optimizer)
    assert seen == {"layer3": False, "layer4": True}


def emulating_card(monkeypatch, native: bool) -> None:
    """A CUDA card as torch reports it: bf16 natively, or (V100, T4) only by emulation."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)


def test_the_bench_picks_fp16_where_the_card_only_emulates_bf16(monkeypatch):
    emulating_card(monkeypatch, native=False)
    assert torch.cuda.is_bf16_supported()  # the control: asked the default way, emulation counts
    assert default_precision(torch.device("cuda", 0)) == "fp16"
    emulating_card(monkeypatch, native=True)
    assert default_precision(torch.device("cuda", 0)) == "bf16"
    assert default_precision(torch.device("cpu")) == "fp32"


def test_the_bench_waits_for_the_device_it_measures(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    synchronizer(torch.device("cuda", 1))()
    assert waited == [torch.device("cuda", 1)]
    synchronizer(torch.device("cpu"))()
    assert waited == [torch.device("cuda", 1)]


def test_compiled_end_to_end_warm_up_sees_every_batch_shape_before_the_clock_starts():
    loader = DataLoader(TensorDataset(torch.zeros(10, 1)), batch_size=4, shuffle=True)  # batches of 4, 4, 2
    shapes = {len(batch[0]) for batch in loader}

    def seen_in_warmup(compiled: bool) -> set[int]:
        batches = (len(b[0]) for _ in range(10) for b in loader)
        return {next(batches) for _ in range(warmup_batches(loader, compiled))}

    assert seen_in_warmup(compiled=True) == shapes == {4, 2}
    assert seen_in_warmup(compiled=False) == {4}  # eager needs no more: the clock may meet a new shape
