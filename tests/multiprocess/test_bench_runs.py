"""``anemia-dist bench`` run for real, and the training-speed habits measured in real training:
compiling (alone and under DDP), and steps that neither wait for nor copy to the device."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY, TINY_BENCH, check, launch, make_image_folder, phase_step
from torch.utils._python_dispatch import TorchDispatchMode

from anemia_dist.config import ModelConfig
from anemia_dist.model import build_model, freeze_backbone, optimizer_param_groups, unfreeze

pytestmark = pytest.mark.multiprocess


def run_bench(tmp_path, *args: str) -> tuple[str, dict]:
    output = tmp_path / "bench.json"
    result = check(
        subprocess.run(
            [sys.executable, "-m", "anemia_dist", "bench", *TINY_BENCH, "--output", str(output), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
    )
    return result.stdout, json.loads(output.read_text())


def test_bench_compares_both_pipelines_and_both_phases_in_one_run(tmp_path):
    stdout, results = run_bench(tmp_path, "--small", "6", "--large", "1")
    assert [r["set"] for r in results["data"]] == ["640x480", "3000x4000"]
    assert [r["images"] for r in results["data"]] == [6, 1]
    for row in results["data"]:
        assert row["pil_images_per_s"] > 0 and row["cached_images_per_s"] > 0
        assert row["ratio"] == row["cached_images_per_s"] / row["pil_images_per_s"]
        assert row["decoded"] == row["images"], "the cache decodes each image once"
    model = results["model"]
    assert model["phase1_vs_forward"] == model["phase1_images_per_s"] / model["forward_images_per_s"]
    assert model["phase2_vs_phase1"] == model["phase2_images_per_s"] / model["phase1_images_per_s"]
    assert [r["set"] for r in results["end_to_end"]] == ["640x480", "3000x4000"]
    assert results["config"]["workers"] == 0 and results["machine"]["device"] == "cpu"
    for words in ("PIL", "cached", "forward only", "phase 1 train", "phase 2 train", "end-to-end"):
        assert words in stdout


def test_compiled_model_trains_layer4_after_the_unfreeze():
    # train.compile compiles in place; the unfreeze must reach the compiled graph (a guard on
    # requires_grad recompiles it). aot_eager traces like inductor without generating C++.
    model = build_model(ModelConfig(arch="resnet18", weights="none", hidden=16), 2)
    freeze_backbone(model)
    model.compile(backend="aot_eager")
    optimizer = torch.optim.Adam(optimizer_param_groups(model, ["layer4"]), lr=1e-3)
    layer4 = model.layer4[0].conv1.weight
    before = layer4.detach().clone()
    phase_step(model, optimizer)
    assert torch.equal(layer4, before)
    unfreeze(model, ["layer4"])
    phase_step(model, optimizer)
    assert not torch.equal(layer4, before)
    assert next(iter(model.state_dict())) == "conv1.weight", "checkpoint keys unchanged by compiling"


COMPILE_SPY = textwrap.dedent("""
    import hashlib, json, os, sys
    import torch
    compile_in_place = torch.nn.Module.compile
    torch.nn.Module.compile = lambda self, **kwargs: compile_in_place(self, backend="aot_eager")
    import anemia_dist.trainer as trainer
    from anemia_dist.config import load_config
    from anemia_dist.tasks import ClassifyTask

    hashes, validate = [], ClassifyTask.validate

    def spy(task, accelerator, model, loader, class_weights):
        result = validate(task, accelerator, model, loader, class_weights)
        layer4 = accelerator.unwrap_model(model).layer4.state_dict().values()
        hashes.append(hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in layer4)).hexdigest())
        return result

    ClassifyTask.validate = spy
    trainer.train(load_config(None, sys.argv[2:]))
    with open(os.path.join(sys.argv[1], "rank" + os.environ["RANK"] + ".json"), "w") as handle:
        json.dump(hashes, handle)
""")


def test_compiled_model_under_ddp_keeps_layer4_identical_on_both_ranks_after_the_unfreeze(tmp_path):
    spy = tmp_path / "compile_spy.py"
    spy.write_text(COMPILE_SPY)
    data = make_image_folder(tmp_path / "data", {"anemic": 10, "non-anemic": 14})
    check(
        launch(
            [
                str(spy),
                str(tmp_path),
                *TINY,
                f"data.root={data}",
                f"run.output_dir={tmp_path / 'runs'}",
                "train.epochs=3",
                "unfreeze.head_only_epochs=1",
                "train.compile=true",
            ]
        )
    )
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert ranks[0] == ranks[1], "DDP all-reduces the unfrozen layer4 of the compiled model"
    assert len(set(ranks[0])) == 3, "layer4 trains after the unfreeze (epochs 2 and 3)"


class HostDeviceTraffic(TorchDispatchMode):
    """Counts, among the ops this package's own code issues, ``.item()`` reads (on a GPU the host
    waits for the device) and tensors built from host values (on a GPU a blocking copy, which
    waits too). On the CPU the same ops run, so the count is what a GPU run would do."""

    def __init__(self) -> None:
        super().__init__()
        self.readbacks = self.uploads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        watched = func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.lift_fresh.default)
        if watched and self.issued_by_this_package():
            self.readbacks += func is torch.ops.aten._local_scalar_dense.default
            self.uploads += func is torch.ops.aten.lift_fresh.default
        return func(*args, **(kwargs or {}))

    @staticmethod
    def issued_by_this_package() -> bool:
        """The innermost caller outside torch is in anemia_dist: torch's own host-side
        bookkeeping (Adam's CPU step counters, the sampler's seed) is not device traffic."""
        torch_dir = Path(torch.__file__).parent
        for frame in reversed(traceback.extract_stack()[:-2]):
            if not Path(frame.filename).is_relative_to(torch_dir):
                return Path(frame.filename).is_relative_to(ROOT / "anemia_dist")
        return False


def test_training_steps_neither_wait_for_nor_copy_to_the_device(tmp_path, monkeypatch):
    # Per step the host only queues work: the loss is read back for the progress bar every 20
    # steps and the epoch's totals are uploaded once; the preemption flag is plain Python on one
    # process (under DDP an all-reduce over a CPU group).
    from anemia_dist import batch_augment, trainer
    from anemia_dist.config import load_config

    traffic = []
    real = trainer.train_one_epoch

    def recorded(*args, **kwargs):
        with HostDeviceTraffic() as counter:
            stats = real(*args, **kwargs)
        traffic.append((stats.steps, counter.uploads, counter.readbacks))
        return stats

    monkeypatch.setattr(trainer, "train_one_epoch", recorded)
    # copied to a device once per process (per normalisation): not per step
    batch_augment._grey_weights(torch.device("cpu"))
    batch_augment._normalisation(torch.device("cpu"), batch_augment.IMAGENET_MEAN, batch_augment.IMAGENET_STD)
    data = make_image_folder(tmp_path / "data", {"anemic": 12, "non-anemic": 12})
    cfg = load_config(
        None,
        [
            *TINY,
            f"data.root={data}",
            "train.batch_size=2",
            "train.epochs=2",
            "unfreeze.head_only_epochs=1",
            "data.val_fraction=0.25",
            f"run.output_dir={tmp_path / 'runs'}",
            "run.name=r",
            "eval.bootstrap=100",
        ],
    )
    trainer.train(cfg)
    assert traffic == [(9, 1, 1), (9, 1, 1)]  # 9 steps per epoch, before and after the unfreeze
