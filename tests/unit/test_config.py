"""Config: dataclass defaults are the methodology; files and overrides only change them."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import yaml
from helpers import ROOT

from anemia_dist.config import Config, load_config, packaged_config
from anemia_dist.errors import ConfigError


def test_defaults_are_the_methodology():
    cfg = Config()
    assert (cfg.model.arch, cfg.model.weights, cfg.model.hidden, cfg.model.dropout) == (
        "resnet50",
        "imagenet",
        512,
        0.5,
    )
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (1e-4, 1e-4)
    assert (cfg.scheduler.factor, cfg.scheduler.patience) == (0.5, 3)
    assert cfg.scheduler.min_lr > 0
    assert (cfg.unfreeze.head_only_epochs, cfg.unfreeze.layers) == (5, ["layer4"])
    assert cfg.early_stopping.patience == 5
    assert cfg.data.image_size == 224


def test_packaged_default_yaml_equals_the_dataclass_defaults():
    assert load_config("default") == Config()
    assert load_config(packaged_config("default")) == Config()
    unresolved = {f.name: dataclasses.asdict(f.default_factory()) for f in dataclasses.fields(Config)}
    assert unresolved["unfreeze"]["layers"] == ["last"] and unresolved["data"]["image_size"] is None
    assert yaml.safe_load(packaged_config("default").read_text()) == unresolved, "it lists every key, as written"


def test_the_packaged_default_config_takes_a_timm_backbone():
    """default.yaml says ``last`` and ``image_size: null``, not ResNet's resolved ``layer4`` and 224."""
    cfg = load_config("default", ["model.arch=timm:convnext_atto", "data.root=x"])
    assert (cfg.unfreeze.layers, cfg.data.image_size) == (["last"], 224)
    assert load_config("default", ["model.arch=timm:resnet10t"]).data.image_size == 176


def test_image_size_is_the_backbones_pretrained_input_size_unless_set():
    assert Config().data.image_size == 224, "ResNet-50: the methodology's 224"
    assert load_config(None, ["model.arch=resnet18"]).data.image_size == 224
    assert load_config(None, ["model.arch=timm:resnet10t"]).data.image_size == 176, "timm's pretrained config"
    assert load_config(None, ["model.arch=timm:test_convnext"]).data.image_size == 160
    assert load_config(None, ["model.arch=timm:resnet10t", "data.image_size=96"]).data.image_size == 96
    assert load_config(None, ["data.image_size=null"]).data.image_size == 224
    with pytest.raises(ConfigError, match="timm has no model"):
        load_config(None, ["model.arch=timm:resnet10tt"])


def test_overrides_apply_on_top_of_the_file_with_yaml_typed_values():
    cfg = load_config("demo", ["train.epochs=3", "optim.lr=1e-3", "unfreeze.layers=[layer3, layer4]", "run.name=x"])
    assert cfg.train.epochs == 3 and cfg.optim.lr == 1e-3
    assert cfg.unfreeze.layers == ["layer3", "layer4"]
    assert cfg.model.weights == "none"  # from demo.yaml
    assert cfg.run.name == "x"


@pytest.mark.parametrize(
    "override, names",
    [
        ("data.vall_fraction=0.3", ["data.vall_fraction", "did you mean data.val_fraction"]),
        ("trian.epochs=3", ["trian", "did you mean train"]),
        ("train.epochs=three", ["train.epochs", "integer"]),
        ("train.epochs=0", ["train.epochs", ">= 1"]),
        ("data.val_fraction=1.5", ["data.val_fraction", "(0, 1)"]),
        ("model.arch=vgg16", ["model.arch", "resnet50"]),
        ("model.weights=/no/such/file.pt", ["model.weights", "no such file"]),
        ("unfreeze.layers=[layer5]", ["unfreeze.layers", "layer5"]),
        ("train.mixed_precision=fp8", ["train.mixed_precision", "bf16"]),
        ("optim.lr=fast", ["optim.lr", "number"]),
        ("noequals", ["section.key=value"]),
    ],
)
def test_bad_config_values_name_the_key(override, names):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    for name in names:
        assert name in str(error.value)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("demo", ["train.seed=7"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text())["train"]["seed"] == 7


def _dotted_keys(obj, prefix=""):
    import dataclasses

    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _dotted_keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_config_reference_lists_every_key_and_the_readme_links_it():
    reference = (ROOT / "docs" / "configuration.md").read_text()
    missing = [key for key in _dotted_keys(Config()) if f"`{key}`" not in reference]
    assert not missing, f"document these keys in docs/configuration.md: {missing}"
    assert "(docs/configuration.md)" in (ROOT / "README.md").read_text()


def test_the_old_unfreeze_epoch_key_still_works_with_a_warning_naming_the_new_one(tmp_path):
    with pytest.warns(FutureWarning, match=r"unfreeze.epoch is now called unfreeze.head_only_epochs"):
        assert load_config(None, ["unfreeze.epoch=2"]).unfreeze.head_only_epochs == 2
    old_file = tmp_path / "old.yaml"
    old_file.write_text("unfreeze:\n  epoch: 3\n")
    with pytest.warns(FutureWarning, match="unfreeze.head_only_epochs=3"):
        assert load_config(old_file).unfreeze.head_only_epochs == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new key: no warning
        assert load_config(None, ["unfreeze.head_only_epochs=4"]).unfreeze.head_only_epochs == 4


def test_the_old_and_the_new_unfreeze_key_together_are_an_error():
    with pytest.raises(ConfigError, match=r"^unfreeze.epoch: is the old name of unfreeze.head_only_epochs"):
        load_config(None, ["unfreeze.epoch=2", "unfreeze.head_only_epochs=3"])
