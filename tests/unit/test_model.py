"""The model: head shape, freezing, frozen BatchNorm, and where weights come from."""

from __future__ import annotations

import pytest
import torch
import torchvision

from anemia_dist import model as model_lib
from anemia_dist.cli import main
from anemia_dist.config import ModelConfig
from anemia_dist.errors import WeightsError
from anemia_dist.model import build_model, freeze_backbone, set_train_mode, trainable_stages, unfreeze


def tiny(**kwargs) -> ModelConfig:
    return ModelConfig(arch="resnet18", weights="none", **kwargs)


def frozen(cfg: ModelConfig) -> torch.nn.Module:
    """The model as training starts it: built, then its backbone frozen."""
    model = build_model(cfg, 2)
    freeze_backbone(model)
    return model


def test_head_is_linear_relu_dropout_linear_and_only_it_trains():
    model = frozen(ModelConfig(arch="resnet50", weights="none"))
    layers = list(model.fc)
    assert [type(m) for m in layers] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Dropout, torch.nn.Linear]
    assert (layers[0].in_features, layers[0].out_features, layers[2].p, layers[3].out_features) == (2048, 512, 0.5, 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("fc.") for n in trainable)
    assert trainable_stages(model) == []


def test_unfreeze_adds_only_the_named_stages():
    model = frozen(tiny())
    unfreeze(model, ["layer4"])
    assert trainable_stages(model) == ["layer4"]
    assert not any(p.requires_grad for p in model.layer3.parameters())


def test_frozen_batchnorm_statistics_do_not_drift_in_train_mode():
    model = frozen(tiny())
    before = model.layer1[0].bn1.running_mean.clone()
    set_train_mode(model)
    model(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert torch.equal(model.layer1[0].bn1.running_mean, before)
    assert model.fc.training
    unfreeze(model, ["layer4"])
    set_train_mode(model)
    assert model.layer4[0].bn1.training and not model.layer3[0].bn1.training


def test_imagenet_weights_load_from_the_local_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision.models.resnet18(weights=None)
    path = model_lib.imagenet_cache_path("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    model = build_model(ModelConfig(arch="resnet18", weights="imagenet"), 2)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)


def test_missing_imagenet_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as error:
        build_model(ModelConfig(arch="resnet18", weights="imagenet"), 2)
    message = str(error.value)
    assert "anemia-dist fetch-weights --arch resnet18" in message
    assert str(model_lib.imagenet_cache_path("resnet18")) in message


def test_fetch_weights_offline_fails_with_a_copy_instruction(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError) as error:
        model_lib.fetch_imagenet_weights("resnet18")
    assert "Network is unreachable" in str(error.value)
    assert str(model_lib.imagenet_cache_path("resnet18")) in str(error.value)


def test_fetch_weights_command_exits_2_with_the_message(tmp_path, monkeypatch, capsys):
    # The real download, through a proxy that refuses the connection: it fails as without internet.
    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    assert main(["fetch-weights", "--arch", "resnet18"]) == 2
    stderr = capsys.readouterr().err
    assert "could not download" in stderr and "copy the file to" in stderr


def test_weights_file_accepts_a_backbone_state_dict_and_rejects_another_arch(tmp_path):
    source = torchvision.models.resnet18(weights=None)
    backbone = tmp_path / "backbone.pt"
    torch.save(source.state_dict(), backbone)
    model = build_model(ModelConfig(arch="resnet18", weights=str(backbone)), 2)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    with pytest.raises(WeightsError, match="check model.arch"):
        build_model(ModelConfig(arch="resnet34", weights=str(backbone)), 2)
