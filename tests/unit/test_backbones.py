"""timm backbones (``model.arch=timm:<name>``): head on the pooled features, the backbone's own
stages for unfreezing, frozen norm layers in eval mode, preprocessing, weights from the local
Hugging Face hub cache. Tiny models, random init, 32 px: nothing is downloaded."""

from __future__ import annotations

import pytest
import timm
import torch
from accelerate import Accelerator
from huggingface_hub import constants
from PIL import Image
from safetensors.torch import save_file

from anemia_dist import backbones
from anemia_dist.checkpointing import Checkpointer
from anemia_dist.config import ModelConfig, load_config, timm_pretrained_cfg
from anemia_dist.errors import ConfigError, WeightsError
from anemia_dist.inference import load_best, model_inputs
from anemia_dist.metrics import OperatingPoint
from anemia_dist.model import (
    backbone_stages,
    build_model,
    freeze_backbone,
    optimizer_param_groups,
    preprocessing,
    resolve_stages,
    set_train_mode,
    trainable_stages,
    unfreeze,
)
from anemia_dist.run_dir import BEST
from anemia_dist.sources import Sample
from anemia_dist.transforms import IMAGENET_MEAN, IMAGENET_STD

STAGES = {
    "timm:resnet10t": ["stem", "layer1", "layer2", "layer3", "layer4"],
    "timm:convnext_atto": ["stem", "stages.0", "stages.1", "stages.2", "stages.3"],
    "timm:vit_tiny_patch16_224": ["stem"] + [f"blocks.{i}" for i in range(12)],
}


def frozen(arch: str) -> torch.nn.Module:
    model = build_model(ModelConfig(arch=arch, weights="none", hidden=8), 2, image_size=32)
    freeze_backbone(model)
    return model


@pytest.mark.parametrize("arch", list(STAGES))
def test_head_sits_on_the_pooled_features_and_the_stages_are_the_backbones_own(arch):
    model = frozen(arch)
    assert model.fc[0].in_features == model.backbone.num_features
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2)
    stages = backbone_stages(model)
    assert list(stages) == STAGES[arch]
    # every backbone parameter is in exactly one stage
    in_stages = [id(p) for params in stages.values() for p in params]
    assert sorted(in_stages) == sorted(id(p) for p in model.backbone.parameters())
    assert trainable_stages(model) == []


@pytest.mark.parametrize("arch", list(STAGES))
def test_last_unfreezes_the_final_stage_only(arch):
    model = frozen(arch)
    unfreeze(model, ["last"])
    final = STAGES[arch][-1]
    assert trainable_stages(model) == [final]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith(f"backbone.{final}.") for n in trainable)
    assert not any(n.startswith(f"backbone.{STAGES[arch][-2]}.") for n in trainable)
    assert [g["name"] for g in optimizer_param_groups(model, ["last"])] == ["head", final]


def test_the_final_norm_after_the_last_stage_belongs_to_it():
    vit = frozen("timm:vit_tiny_patch16_224")
    unfreeze(vit, ["last"])
    assert vit.backbone.norm.weight.requires_grad and vit.backbone.blocks[11].mlp.fc1.weight.requires_grad
    convnext = frozen("timm:convnext_atto")
    unfreeze(convnext, ["stages.3"])
    assert convnext.backbone.head.norm.weight.requires_grad


def test_an_unknown_stage_is_refused_with_the_valid_names():
    model = frozen("timm:convnext_atto")
    with pytest.raises(ConfigError) as error:
        unfreeze(model, ["layer4"])
    message = str(error.value)
    assert "unfreeze.layers" in message and "'layer4'" in message
    assert all(f"'{name}'" in message for name in STAGES["timm:convnext_atto"]) and "last" in message
    assert resolve_stages(model, ["stages.2", "last", "stages.3"]) == ["stages.2", "stages.3"]


def test_resnet_default_unfreezing_is_still_layer4():
    cfg = load_config(None, [])
    assert cfg.unfreeze.layers == ["layer4"]
    assert load_config(None, ["unfreeze.layers=[last, layer3]"]).unfreeze.layers == ["layer4", "layer3"]
    with pytest.raises(ConfigError, match="choose from"):
        load_config(None, ["unfreeze.layers=[stages.3]"])
    timm_cfg = load_config(None, ["model.arch=timm:convnext_atto"])
    assert timm_cfg.unfreeze.layers == ["last"]  # resolved when the backbone is built


def test_frozen_norm_layers_stay_in_eval_mode_and_keep_their_statistics():
    model = frozen("timm:resnet10t")
    before = model.backbone.layer1[0].bn1.running_mean.clone()
    set_train_mode(model)
    model(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert torch.equal(model.backbone.layer1[0].bn1.running_mean, before)
    assert model.fc.training
    unfreeze(model, ["last"])
    set_train_mode(model)
    assert model.backbone.layer4[0].bn1.training and not model.backbone.layer3[0].bn1.training

    convnext = frozen("timm:convnext_atto")
    unfreeze(convnext, ["last"])
    set_train_mode(convnext)
    norms = {n: m.training for n, m in convnext.named_modules() if "Norm" in type(m).__name__}
    assert norms and all(not t for n, t in norms.items() if n.startswith("backbone.stages.2."))
    assert all(t for n, t in norms.items() if n.startswith("backbone.stages.3.") or n == "backbone.head.norm")


def test_preprocessing_comes_from_the_pretrained_config():
    assert preprocessing("resnet50")["mean"] == [0.485, 0.456, 0.406]
    vit = preprocessing("timm:vit_tiny_patch16_224")
    assert (vit["mean"], vit["std"], vit["pretrained_input_size"]) == ([0.5] * 3, [0.5] * 3, 224)


def test_a_misspelt_timm_model_is_a_config_error():
    with pytest.raises(ConfigError, match="timm has no model"):
        build_model(ModelConfig(arch="timm:convnext_attoo", weights="none"), 2)
    with pytest.raises(ConfigError, match="model.arch"):
        ModelConfig(arch="timm:")


def fake_hub_cache(tmp_path, monkeypatch, arch: str) -> torch.nn.Module:
    """The Hugging Face hub cache layout hf_hub_download leaves, holding a random model's weights."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    reference = timm.create_model(backbones.timm_name(arch))
    repo = timm_pretrained_cfg(arch)["hf_hub_id"]
    folder = tmp_path / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abc")
    (folder / "snapshots" / "0123abc").mkdir(parents=True)
    save_file(reference.state_dict(), str(folder / "snapshots" / "0123abc" / "model.safetensors"))
    return reference


def test_pretrained_weights_load_from_the_local_hub_cache(tmp_path, monkeypatch):
    reference = fake_hub_cache(tmp_path, monkeypatch, "timm:resnet10t")
    model = build_model(ModelConfig(arch="timm:resnet10t", weights="imagenet"), 2)
    assert torch.equal(model.backbone.layer4[0].conv1.weight, reference.layer4[0].conv1.weight)
    assert torch.equal(model.backbone.layer4[0].bn1.running_var, reference.layer4[0].bn1.running_var)


def test_missing_weights_say_how_to_fetch_them(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsError) as error:
        build_model(ModelConfig(arch="timm:resnet10t", weights="imagenet"), 2)
    message = str(error.value)
    assert "anemia-dist fetch-weights --arch timm:resnet10t" in message
    assert str(tmp_path / "models--timm--resnet10t.c3_in1k") in message


def test_fetch_weights_offline_fails_with_a_copy_instruction(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(backbones, "hf_hub_download", offline)
    with pytest.raises(WeightsError) as error:
        backbones.fetch_timm_weights("timm:resnet10t")
    assert "Network is unreachable" in str(error.value) and "models--timm--resnet10t.c3_in1k" in str(error.value)


def test_predict_normalises_with_the_checkpoints_saved_normalisation(tmp_path):
    """A ViT pretrained with mean/std 0.5 is fed (x - 0.5) / 0.5 at inference, not ImageNet's constants."""
    path = tmp_path / "grey.png"
    Image.new("RGB", (32, 32), (255, 255, 255)).save(path)
    meta = {"image_size": 32, "alpha_background": [0, 0, 0]}
    samples = [Sample(str(path), 0, str(path))]
    vit = {**meta, "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    inputs = model_inputs(samples, vit)
    assert torch.allclose(inputs.batch_transform(inputs[0][0][None]), torch.ones(1, 3, 32, 32))
    old = model_inputs(samples, meta)  # checkpoints from before meta.json held it: ImageNet's
    white = old.batch_transform(old[0][0][None])[0, :, 0, 0]
    assert torch.allclose(white, (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD))


def test_the_backbones_input_size_is_saved_in_meta_and_used_by_inference(tmp_path):
    """timm's test_convnext is pretrained at 160 px: with data.image_size left null it trains at 160,
    meta.json says so, and inference rebuilds the model and decodes its images at 160 (not 224)."""
    overrides = ["model.arch=timm:test_convnext", "model.weights=none", "model.hidden=8"]
    cfg = load_config(None, overrides)
    assert cfg.data.image_size == 160 and load_config(None, [*overrides, "data.image_size=32"]).data.image_size == 32
    model = build_model(cfg.model, 2, cfg.data.image_size)
    point = OperatingPoint("anemic", 0.5, "fixed", 1.0)
    Checkpointer(Accelerator(), tmp_path, cfg, ["anemic", "non-anemic"]).save_best(model, 1, 0.7, 0.5, point)
    rebuilt, meta = load_best(tmp_path / BEST)
    assert (meta["image_size"], meta["pretrained_input_size"]) == (160, 160)
    path = tmp_path / "eye.png"
    Image.new("RGB", (300, 200), (180, 40, 40)).save(path)
    inputs = model_inputs([Sample(str(path), 0, str(path))], meta)
    batch = inputs.batch_transform(inputs[0][0][None])
    assert batch.shape == (1, 3, 160, 160)
    assert rebuilt(batch).shape == (1, 2)
