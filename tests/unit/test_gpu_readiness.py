"""The CUDA-only failure modes of issue 18, pinned on the CPU: collective timeouts, read-backs
that stall the device, blocking copies, precision disagreements, determinism and recompiles."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from types import SimpleNamespace

import accelerate.accelerator
import accelerate.data_loader
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from helpers import TINY, make_best, make_image_folder, read_csv
from torch import nn
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.testing import CompileCounterWithBackend
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from anemia_dist import trainer, validation
from anemia_dist.checkpointing import Checkpointer
from anemia_dist.config import load_config
from anemia_dist.distributed import collective_timeout
from anemia_dist.errors import ConfigError
from anemia_dist.inference import evaluate, load_model, model_inputs, predict
from anemia_dist.metrics import OperatingPoint
from anemia_dist.model import build_model, freeze_backbone, set_train_mode, unfreeze
from anemia_dist.preemption import PreemptionWatcher
from anemia_dist.progress import TrainingProgress
from anemia_dist.run_dir import BEST, META, PREDICTIONS
from anemia_dist.sources import Sample
from anemia_dist.tasks import ClassifyTask
from anemia_dist.torch_settings import CUBLAS_WORKSPACE, make_deterministic
from anemia_dist.trainer import (
    Training,
    build_optimizer,
    make_accelerator,
    rest_of_epoch,
    train_one_epoch,
    unfreeze_stages,
)
from anemia_dist.validation import validate


def test_the_accelerator_is_built_with_the_configured_collective_timeout():
    cfg = load_config("demo", ["train.collective_timeout_minutes=90"])
    accelerator = make_accelerator(cfg)
    assert accelerator.init_handler is not None
    assert accelerator.init_handler.to_kwargs() == {"timeout": timedelta(minutes=90)}


def test_the_default_collective_timeout_is_longer_than_nccls_ten_minutes():
    default = load_config("demo", []).train.collective_timeout_minutes
    assert collective_timeout(default).timeout > timedelta(minutes=10)


def test_a_non_positive_collective_timeout_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="train.collective_timeout_minutes"):
        load_config("demo", ["train.collective_timeout_minutes=0"])


class ReadBacks(TorchDispatchMode):
    """Counts every aten op that copies a device value to the host (``.item()``, ``bool(t)``, ...)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def train_steps(fused: bool, scaler: torch.amp.GradScaler | None = None, steps: int = 3) -> tuple[nn.Module, list[int]]:
    """A tiny ResNet through the package's optimiser: head-only steps, then layer4 unfrozen; the
    read-backs of each optimiser step (with ``scaler``, under CPU bf16 autocast)."""
    torch.manual_seed(0)
    cfg = load_config(None, TINY)
    model = build_model(cfg.model, 2)
    freeze_backbone(model)
    optimizer = build_optimizer(model, cfg, fused=fused)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    counts = []
    for step in range(2 * steps):
        if step == steps:
            unfreeze(model, cfg.unfreeze.layers)
        set_train_mode(model)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=scaler is not None):
            loss = F.cross_entropy(model(images).float(), labels)
        with ReadBacks() as reads:
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
        optimizer.zero_grad(set_to_none=True)
        counts.append(reads.count)
    return model, counts


def adam_after_given_gradients(fused: bool) -> nn.Module:
    """The package's optimiser fed the same gradients (head only, then layer4 too): no feedback
    through the forward pass, so any difference is the update's own."""
    torch.manual_seed(0)
    cfg = load_config(None, TINY)
    model = build_model(cfg.model, 2)
    freeze_backbone(model)
    optimizer = build_optimizer(model, cfg, fused=fused)
    generator = torch.Generator().manual_seed(1)
    for step in range(6):
        if step == 3:
            unfreeze(model, cfg.unfreeze.layers)
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.grad = torch.randn(parameter.shape, generator=generator)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def test_fused_adam_takes_the_same_steps_as_the_unfused_one():
    fused, unfused = adam_after_given_gradients(True), adam_after_given_gradients(False)
    for (name, a), (_, b) in zip(fused.named_parameters(), unfused.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    torch.manual_seed(0)
    start = build_model(load_config(None, TINY).model, 2)
    assert not torch.equal(fused.layer4[0].conv1.weight, start.layer4[0].conv1.weight)  # both really trained


def test_a_scaled_step_of_the_fused_adam_never_reads_back_from_the_device():
    _, fused = train_steps(fused=True, scaler=torch.amp.GradScaler("cpu"))
    _, unfused = train_steps(fused=False, scaler=torch.amp.GradScaler("cpu"))
    assert fused == [0] * 6
    assert all(count > 0 for count in unfused)  # the control: the counter sees GradScaler's .item()


def test_the_rest_of_a_resumed_epoch_is_copied_without_blocking_like_the_prepared_loader(monkeypatch):
    accelerator = make_accelerator(load_config("demo", []))
    loader = accelerator.prepare_data_loader(DataLoader(TensorDataset(torch.arange(12)), batch_size=2))
    assert loader._non_blocking
    # Accelerate <= 1.15 dropped the flag; emulate it, so the test pins the package's own carry-over.
    skip = accelerate.data_loader.skip_first_batches

    def dropping(dataloader, num_batches=0):
        skipped = skip(dataloader, num_batches)
        skipped._non_blocking = False
        return skipped

    monkeypatch.setattr(accelerate.accelerator, "skip_first_batches", dropping)
    assert not accelerator.skip_first_batches(loader, 2)._non_blocking  # the control: the old behaviour
    rest = rest_of_epoch(accelerator, loader, 2)
    assert rest._non_blocking
    assert [batch[0].tolist() for batch in rest] == [[4, 5], [6, 7], [8, 9], [10, 11]]
    assert rest_of_epoch(accelerator, loader, 0) is loader


READ_BACKS = {
    torch.Tensor.cpu,
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
}


class HostCopies(TorchFunctionMode):
    """Counts the tensor methods that copy to the host (on a GPU: a wait for the device)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in READ_BACKS
        return func(*args, **(kwargs or {}))


def host_copies_per_pass(tmp_path, images: int) -> tuple[int, int]:
    """(validate, predict) host copies for one pass over ``images`` images in batches of 2."""
    best = make_best(tmp_path / f"{images}" / BEST, ["anemic", "non-anemic"])
    folder = make_image_folder(tmp_path / f"data{images}", {"anemic": images // 2, "non-anemic": images // 2})
    files = sorted(folder.rglob("*.png"))
    model, meta, _ = load_model(best)
    samples = [Sample(str(path), int(path.parent.name == "non-anemic"), str(path)) for path in files]
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare_data_loader(DataLoader(model_inputs(samples, meta), batch_size=2))
    with HostCopies() as during_validation:
        validate(accelerator, model, loader, torch.ones(2))
    with HostCopies() as during_predict:
        predict(best, files, batch_size=2, num_workers=0)
    return during_validation.count, during_predict.count


def test_validate_and_predict_read_back_once_per_pass_not_per_batch(tmp_path):
    few, many = host_copies_per_pass(tmp_path, 4), host_copies_per_pass(tmp_path, 12)
    assert few == many  # 2 batches or 6: the same copies, so none inside the loop
    assert all(count >= 1 for count in few)  # the control: the counter sees the final copy


def test_evaluate_copies_batches_without_blocking(monkeypatch, tmp_path):
    seen = []
    real = accelerate.data_loader.DataLoaderShard.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("_non_blocking"))
        real(self, *args, **kwargs)

    monkeypatch.setattr(accelerate.data_loader.DataLoaderShard, "__init__", spy)
    best = make_best(tmp_path / BEST, ["anemic", "non-anemic"])
    folder = make_image_folder(tmp_path / "data", {"anemic": 2, "non-anemic": 2})
    evaluate(best, folder, ["data.num_workers=0", "eval.bootstrap=100"], batch_size=2, report_dir=tmp_path / "r")
    assert seen == [True]


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate's state is a process-wide singleton: a test that needs another precision resets it."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def validation_and_predict_scores(tmp_path, recorded: bool) -> tuple[np.ndarray, np.ndarray]:
    """P(anemic) of the same images from training's bf16 validation and from ``predict``."""
    classes = ["anemic", "non-anemic"]
    folder = make_image_folder(tmp_path / "data", {"anemic": 6, "non-anemic": 6}, size=40)
    files = sorted(folder.rglob("*.png"))
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model, 2).to(memory_format=torch.channels_last)
    Checkpointer(accelerator, tmp_path, cfg, classes).save_best(
        model, 1, 0.7, 0.5, OperatingPoint("anemic", 0.5, "fixed")
    )
    if not recorded:  # a checkpoint as saved before the precision was recorded
        meta = json.loads((tmp_path / BEST / META).read_text())
        del meta["mixed_precision"]
        (tmp_path / BEST / META).write_text(json.dumps(meta))
    samples = [Sample(str(path), classes.index(path.parent.name), str(path)) for path in files]
    loader = DataLoader(model_inputs(samples, load_model(tmp_path / BEST)[1]), batch_size=4)
    prepared, loader = accelerator.prepare_model(model.eval(), evaluation_mode=True), accelerator.prepare(loader)
    val = validate(accelerator, prepared, loader, torch.ones(2))
    rows = predict(tmp_path / BEST, files, batch_size=4, num_workers=0)
    return val.probs[:, 0].numpy(), np.array([float(row["probability"]) for row in rows])


def test_predict_scores_an_image_as_bf16_validation_scored_it(tmp_path, fresh_accelerator_state):
    validation, predicted = validation_and_predict_scores(tmp_path, recorded=True)
    np.testing.assert_allclose(predicted, validation, rtol=0, atol=5e-7)  # predict writes 6 decimals


def test_without_the_recorded_precision_predict_scores_differ_from_bf16_validation(tmp_path, fresh_accelerator_state):
    validation, predicted = validation_and_predict_scores(tmp_path, recorded=False)
    assert np.abs(predicted - validation).max() > 1e-4  # the control: fp32 against bf16 scores


@pytest.fixture
def restored_torch_flags(monkeypatch):
    """make_deterministic changes process-wide flags: put them back for the other tests."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cudnn = torch.backends.cudnn
    saved = (
        cudnn.benchmark,
        cudnn.deterministic,
        torch.backends.cuda.matmul.fp32_precision,
        cudnn.conv.fp32_precision,
        cudnn.rnn.fp32_precision,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    yield
    cudnn.benchmark, cudnn.deterministic = saved[:2]
    torch.backends.cuda.matmul.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = saved[2:5]
    torch.use_deterministic_algorithms(saved[5], warn_only=saved[6])


def test_train_deterministic_turns_off_autotuning_and_tf32_and_warns_where_no_deterministic_kernel_exists(
    restored_torch_flags,
):
    assert load_config("demo", ["train.deterministic=true"]).train.deterministic
    assert not load_config("demo", []).train.deterministic  # the default leaves the speed settings alone
    make_deterministic()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    precisions = [torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn]
    assert [backend.fp32_precision for backend in precisions] == ["ieee"] * 3  # TF32 off
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE


class ToyResNet(nn.Module):
    """The ResNet's stage names and head, a few channels each: compiles in seconds."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            setattr(self, stage, nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()))
        self.fc = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


def compiles_per_epoch(epochs: int) -> tuple[list[int], int]:
    """Training's epochs (11 training images in batches of 4, 6 validation images), unfrozen at
    epoch 3, compiled with aot_eager: the compiles so far after each epoch, and the variants cached at the end."""
    cfg = load_config("demo", ["train.compile=true"])
    accelerator = make_accelerator(cfg)
    torch.manual_seed(0)
    model = ToyResNet()
    freeze_backbone(model)
    counter = CompileCounterWithBackend("aot_eager")
    model.compile(backend=counter)

    def loader(n: int, **kwargs) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(n, 3, 12, 12), torch.randint(0, 2, (n,))), batch_size=4, **kwargs)

    prepared = accelerator.prepare(model, build_optimizer(model, cfg), loader(11, shuffle=True), loader(6))
    task = ClassifyTask(cfg, SimpleNamespace(classes=["anemic", "non-anemic"]))
    training = Training(*prepared[:2], None, *prepared[2:], torch.ones(2), task)
    watcher, progress, counts = PreemptionWatcher(accelerator), TrainingProgress(), []
    torch.compiler.reset()
    try:
        for epoch in range(1, epochs + 1):
            if epoch == 3:
                training.model = unfreeze_stages(accelerator, training.model, cfg)
            train_one_epoch(accelerator, training, epoch, watcher, progress)
            validate(accelerator, training.model, training.val_loader, torch.ones(2))
            counts.append(counter.frame_count)
    finally:
        watcher.restore()
    cached = len(_debug_get_cache_entry_list(ToyResNet.forward.__code__))
    torch.compiler.reset()
    return counts, cached


@pytest.mark.multiprocess
def test_a_compiled_model_has_one_training_and_one_validation_variant_per_phase():
    counts, cached = compiles_per_epoch(4)
    assert counts == [2, 2, 4, 4]  # the last, smaller batch and the second epoch add none; the unfreeze two
    assert cached == 2  # the frozen phase's variants were dropped: far from dynamo's limit of 8


@pytest.mark.multiprocess
def test_without_a_symbolic_batch_dimension_the_last_batch_compiles_its_own_variant(monkeypatch):
    monkeypatch.setattr(trainer, "any_batch_size", lambda images: images)
    monkeypatch.setattr(validation, "any_batch_size", lambda images: images)
    counts, _ = compiles_per_epoch(1)
    assert counts == [3]  # the control: the counter sees the extra variant


def test_evaluate_in_a_process_that_trained_in_bf16_scores_in_the_checkpoints_precision(
    tmp_path, fresh_accelerator_state
):
    # A study trains and then evaluates in one process: Accelerate's state is already bf16.
    Accelerator(cpu=True, mixed_precision="bf16")
    best = make_best(tmp_path / BEST, ["anemic", "non-anemic"])  # its meta.json: bf16, as this process trains
    folder = make_image_folder(tmp_path / "data", {"anemic": 3, "non-anemic": 3})
    overrides = ["data.num_workers=0", "eval.bootstrap=100"]
    record = evaluate(best, folder, overrides, batch_size=2, report_dir=tmp_path / "r")  # no precision clash
    rows = predict(best, sorted(folder.rglob("*.png")), batch_size=2, num_workers=0)
    assert record["n"] == 6
    scored = {row["path"]: row["probability"] for row in rows}
    evaluated = read_csv(tmp_path / "r" / PREDICTIONS)
    assert all(scored[row["path"]] == row["probability"] for row in evaluated)
