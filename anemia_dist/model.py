"""The backbone (a torchvision ResNet or a timm model) with its classification head, pretrained
weights, preprocessing, freezing and unfreezing by stage."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from .backbones import TimmClassifier, build_timm, fetch_timm_weights, timm_stages
from .config import BACKBONE_STAGES, LAST_STAGE, TIMM_PREFIX, ModelConfig, input_size, timm_pretrained_cfg
from .errors import ConfigError, WeightsError
from .transforms import IMAGENET_MEAN, IMAGENET_STD


def imagenet_weights(arch: str) -> torchvision.models.WeightsEnum:
    return torchvision.models.get_model_weights(arch).DEFAULT


def imagenet_cache_path(arch: str) -> Path:
    """Where torchvision keeps the downloaded file (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(imagenet_weights(arch).url).name


def fetch_weights(arch: str) -> Path:
    """Download the pretrained weights of ``arch`` into its local cache (needs internet)."""
    return fetch_timm_weights(arch) if arch.startswith(TIMM_PREFIX) else fetch_imagenet_weights(arch)


def preprocessing(arch: str) -> dict:
    """The normalisation the backbone was pretrained with, and its pretrained input size."""
    cfg = timm_pretrained_cfg(arch) if arch.startswith(TIMM_PREFIX) else {}
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    return {"mean": list(mean), "std": list(std), "pretrained_input_size": input_size(arch)}


def fetch_imagenet_weights(arch: str) -> Path:
    """Download torchvision's ImageNet weights into the torch hub cache (needs internet)."""
    weights = imagenet_weights(arch)
    target = imagenet_cache_path(arch)
    try:
        weights.get_state_dict(progress=True, check_hash=True)
    except Exception as error:  # urllib/HTTP/SSL errors all mean the same to the user
        raise WeightsError(
            f"could not download {weights.url}: {error}\n"
            f"Without internet: download that URL on another machine and copy the file to {target} "
            f"(or set TORCH_HOME to a folder whose hub/checkpoints/ holds it)."
        ) from None
    return target


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _load_imagenet(model: nn.Module, arch: str) -> None:
    path = imagenet_cache_path(arch)
    if not path.is_file():
        raise WeightsError(
            f"ImageNet weights for {arch} are not in the local torch hub cache ({path}).\n"
            f"On a machine with internet run `anemia-dist fetch-weights --arch {arch}` (it downloads "
            f"{imagenet_weights(arch).url} into that cache) and copy the file to {path} here, "
            f"or train with model.weights=none / model.weights=PATH."
        )
    model.load_state_dict(_read_state_dict(path))


def build_head(in_features: int, hidden: int, dropout: float, num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
    )


def build_model(cfg: ModelConfig, num_classes: int, image_size: int | None = None) -> nn.Module:
    """The backbone with the methodology's head (``fc``) on its pooled features, every parameter
    trainable: training freezes the backbone itself (:func:`freeze_backbone`), where the loop shows it.
    ``image_size``: the input size, for backbones built for one (ViTs)."""
    if cfg.arch.startswith(TIMM_PREFIX):
        backbone = build_timm(cfg.arch, cfg.weights == "imagenet", image_size)
        model = TimmClassifier(backbone, build_head(backbone.num_features, cfg.hidden, cfg.dropout, num_classes))
    else:
        model = torchvision.models.get_model(cfg.arch, weights=None)
        if cfg.weights == "imagenet":
            _load_imagenet(model, cfg.arch)
        model.fc = build_head(model.fc.in_features, cfg.hidden, cfg.dropout, num_classes)
    if cfg.weights not in ("imagenet", "none"):
        load_weights_file(model, Path(cfg.weights))
    return model


def load_weights_file(model: nn.Module, path: Path) -> None:
    """A whole model of this shape, or a backbone-only (ImageNet-style) state dict."""
    state = _read_state_dict(path)
    expected = model.state_dict()
    if set(state) == set(expected):
        model.load_state_dict(state)
        return
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    wanted = {k for k in expected if not k.startswith("fc.")}
    missing, unexpected = sorted(wanted - set(backbone)), sorted(set(backbone) - wanted)
    if missing or unexpected:
        raise WeightsError(
            f"{path}: does not fit a {type(model).__name__} backbone "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}); check model.arch"
        )
    model.load_state_dict(backbone, strict=False)


def freeze_backbone(model: nn.Module) -> None:
    """Only the head (``fc``) trains; the pretrained backbone keeps its weights."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith("fc.")


def backbone_stages(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The stages ``unfreeze.layers`` may name, input to output, with their parameters."""
    if isinstance(model, TimmClassifier):
        return timm_stages(model.backbone)
    return {stage: list(getattr(model, stage).parameters()) for stage in BACKBONE_STAGES}


def resolve_stages(model: nn.Module, names: list[str]) -> list[str]:
    """``unfreeze.layers`` as stage names of this backbone (``last``: its final stage)."""
    stages = list(backbone_stages(model))
    resolved = [stages[-1] if name == LAST_STAGE else name for name in names]
    unknown = [name for name in resolved if name not in stages]
    if unknown:
        raise ConfigError(
            f"unfreeze.layers: unknown stage(s) {unknown} of this backbone; choose from {stages} or {LAST_STAGE}"
        )
    return list(dict.fromkeys(resolved))


def unfreeze(model: nn.Module, stages: list[str]) -> None:
    """The named backbone stages train from now on (under DDP the wrapper must be rebuilt too)."""
    parameters = backbone_stages(model)
    for stage in resolve_stages(model, stages):
        for parameter in parameters[stage]:
            parameter.requires_grad = True


def trainable_stages(model: nn.Module) -> list[str]:
    return [stage for stage, params in backbone_stages(model).items() if any(p.requires_grad for p in params)]


def is_norm(module: nn.Module) -> bool:
    """BatchNorm, LayerNorm, GroupNorm, InstanceNorm, timm's norm layers."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or "Norm" in type(module).__name__


def set_train_mode(model: nn.Module) -> None:
    """``model.train()``, but norm layers whose parameters are frozen stay in eval mode.

    A frozen BatchNorm in train mode still updates its running statistics from head-only
    batches, silently changing the pretrained backbone (and DDP would broadcast rank 0's).
    A norm layer without parameters follows the module that holds it.
    """
    model.train()
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if not is_norm(module):
            continue
        owner = module if any(True for _ in module.parameters()) else modules[name.rpartition(".")[0]]
        if not any(p.requires_grad for p in owner.parameters()):
            module.eval()


def optimizer_param_groups(model: nn.Module, unfreeze_stages: list[str]) -> list[dict]:
    """One group for the head and one per stage that will be unfrozen, all created up front.

    Frozen parameters have no gradient, so Adam leaves them alone until they are unfrozen;
    the optimizer (and its saved state) never changes shape mid-run.
    """
    parameters = backbone_stages(model)
    groups = [{"name": "head", "params": list(model.fc.parameters())}]
    groups += [{"name": stage, "params": parameters[stage]} for stage in resolve_stages(model, unfreeze_stages)]
    return groups
