"""timm backbones (``model.arch=timm:<name>``): building one, its pretrained weights from the local
Hugging Face hub cache, its stages (what ``unfreeze.layers`` names) and its preprocessing.

The stages are timm's own coarse parameter groups (``group_matcher(coarse=True)``, the grouping
timm's layer-wise learning-rate decay uses), named by the backbone's ``feature_info`` modules
(``layer4``, ``stages.3``, ``blocks.11``): the stem first, then the stages input to output. What
follows the last stage (a final norm) belongs to the last stage, so ``last`` unfreezes everything
between the last stage's input and the head.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
from timm.models import group_parameters
from torch import nn

from .config import timm_name, timm_pretrained_cfg
from .errors import WeightsError

STEM = "stem"
WEIGHT_FILES = (constants.SAFETENSORS_SINGLE_FILE, constants.PYTORCH_WEIGHTS_NAME)
"""The files timm reads from a hub repository, in its order of preference."""


class TimmClassifier(nn.Module):
    """A timm backbone without its classifier (pooled features out) and the methodology's head as ``fc``."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.fc = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(images))


def _hub_weights(arch: str) -> tuple[str, str | None]:
    """(hub repository, cached weights file or None)."""
    repo = timm_pretrained_cfg(arch).get("hf_hub_id")
    if not repo:
        raise WeightsError(f"{arch}: timm has no Hugging Face hub weights for it; use model.weights=PATH or none")
    for filename in WEIGHT_FILES:
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return repo, found
    return repo, None


def fetch_timm_weights(arch: str) -> Path:
    """Download the backbone's pretrained weights into the Hugging Face hub cache (needs internet)."""
    repo, _ = _hub_weights(arch)
    errors = []
    for filename in WEIGHT_FILES:
        try:
            return Path(hf_hub_download(repo, filename))
        except Exception as error:  # HTTP/SSL/missing-file errors all mean the same to the user
            errors.append(f"{filename}: {error}")
    raise WeightsError(
        f"could not download the weights of {arch} from https://huggingface.co/{repo}: {'; '.join(errors)}\n"
        f"Without internet: run `anemia-dist fetch-weights --arch {arch}` on another machine and copy its "
        f"{Path(constants.HF_HUB_CACHE) / ('models--' + repo.replace('/', '--'))} folder to the same place here "
        f"(or set HF_HUB_CACHE to a folder that holds it)."
    )


def build_timm(arch: str, pretrained: bool, image_size: int | None) -> nn.Module:
    """The backbone with its classifier removed (``num_classes=0``: pooled features out)."""
    name, kwargs = timm_name(arch), {"num_classes": 0}
    cfg = timm_pretrained_cfg(arch)
    if pretrained:
        repo, path = _hub_weights(arch)
        if path is None:
            raise WeightsError(
                f"pretrained weights for {arch} are not in the local Hugging Face hub cache "
                f"({Path(constants.HF_HUB_CACHE) / ('models--' + repo.replace('/', '--'))}).\n"
                f"On a machine with internet run `anemia-dist fetch-weights --arch {arch}` (it downloads "
                f"{repo} into that cache) and copy the folder here, "
                f"or train with model.weights=none / model.weights=PATH."
            )
        kwargs["pretrained_cfg_overlay"] = {"file": path}
    if image_size is not None and tuple(cfg.get("input_size", ()))[1:] != (image_size, image_size):
        try:  # ViT-like backbones are built for one input size (their position embeddings)
            return timm.create_model(name, pretrained=pretrained, img_size=image_size, **kwargs)
        except TypeError:
            pass  # convolutional: any input size
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _stage_name(parameter_names: list[str], features: list[str]) -> str:
    """The ``feature_info`` module holding the group's first parameter, else the group's common prefix."""
    first = parameter_names[0]
    owners = [f for f in features if first.startswith(f + ".")]
    if owners:
        return max(owners, key=len)
    top = [n.split(".") for n in parameter_names if n.split(".")[0] == first.split(".")[0]]
    prefix = []
    for parts in zip(*top, strict=False):
        if len(set(parts)) != 1 or len(prefix) == 2:
            break
        prefix.append(parts[0])
    return ".".join(prefix) or first.split(".")[0]


def timm_stages(backbone: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Stem, then the stages input to output, each with its parameters (see the module docstring)."""
    groups = list(group_parameters(backbone, backbone.group_matcher(coarse=True)).values())
    features = [info["module"] for info in backbone.feature_info]
    names = [STEM] + [_stage_name(group, features) for group in groups[1:]]
    is_stage = [
        i > 0 and any(f == n or f.startswith(n + ".") or n.startswith(f + ".") for f in features)
        for i, n in enumerate(names)
    ]
    last = max((i for i, flag in enumerate(is_stage) if flag), default=len(names) - 1)
    parameters = dict(backbone.named_parameters())
    stages: dict[str, list[nn.Parameter]] = {}
    for index, group in enumerate(groups):
        stages.setdefault(names[min(index, last)], []).extend(parameters[p] for p in group)
    return stages
