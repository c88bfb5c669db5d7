"""Typed configuration: the dataclasses below hold every default (the methodology).

YAML files and ``key=value`` overrides only change these values. Every problem is reported as a
:class:`~anemia_dist.errors.ConfigError` naming the dotted key, before any work starts. The
allowed architectures and backbone stages live here too, for the CLI and the model to share.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
"""torchvision ResNets with a 2048- or 512-feature ``fc`` the head replaces."""
BACKBONE_STAGES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
"""The ResNet stages, input to output: what ``unfreeze.layers`` may name."""
TIMM_PREFIX = "timm:"
"""``model.arch=timm:<name>``: any timm backbone (its stages are checked when the model is built)."""
LAST_STAGE = "last"
"""In ``unfreeze.layers``: the backbone's final stage (ResNet's ``layer4``)."""
DEFAULT_INPUT_SIZE = 224
"""The input size of the torchvision ResNets (the methodology's), and of timm backbones whose
pretrained config names none."""
RENAMED_KEYS = {"unfreeze.epoch": "unfreeze.head_only_epochs"}
"""Old dotted key -> new: the old one is still read, with a warning."""


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def timm_name(arch: str) -> str:
    return arch[len(TIMM_PREFIX) :]


def timm_pretrained_cfg(arch: str) -> dict:
    """timm's pretrained config of ``timm:<name>`` (mean, std, input size, hub repository), without weights."""
    import timm  # here, not at the top: importing timm loads torch, which most config readers never need
    from timm.models import get_pretrained_cfg

    name = timm_name(arch)
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:8]}*")[:8]
        raise ConfigError(f"model.arch: timm has no model {name!r}; similar names: {close or 'none'}")
    cfg = get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else {}


def input_size(arch: str) -> int:
    """The backbone's pretrained input size: what ``data.image_size=null`` means."""
    if not arch.startswith(TIMM_PREFIX):
        return DEFAULT_INPUT_SIZE
    return int(timm_pretrained_cfg(arch).get("input_size", (3, DEFAULT_INPUT_SIZE))[-1])


CONDITION = re.compile(r"^\s*(?P<column>.+?)\s*(?P<op><=|>=|==|!=|<|>)\s*(?P<value>.+?)\s*$")


def parse_condition(text: str, key: str) -> tuple[str, str, str]:
    """``COLUMN OP VALUE`` (OP one of < <= > >= == !=) as (column, op, value)."""
    match = CONDITION.match(text)
    _check(match is not None, key, f"cannot read condition {text!r}; write COLUMN OP VALUE, e.g. 'Age(Months) < 60'")
    return match["column"], match["op"], match["value"]


@dataclass
class ThresholdRule:
    """One row of a threshold table: the first rule whose conditions all hold sets a row's
    threshold. WHO haemoglobin thresholds differ by age, sex and pregnancy."""

    threshold: float
    when: list[str] = field(default_factory=list)
    """Conditions ``COLUMN OP VALUE`` on manifest columns, all of which must hold; empty: any row."""


@dataclass
class DataConfig:
    """Where the images come from and how they are split."""

    root: str | None = None
    """ImageFolder root: one sub-folder per class."""
    manifest: str | None = None
    """CSV with columns path,label[,group]; relative paths are resolved against the CSV's folder."""
    val_root: str | None = None
    """A separate validation ImageFolder; when set, no split is made."""
    val_manifest: str | None = None
    """A separate validation CSV; when set, no split is made."""
    classes: list[str] | None = None
    """Class names in index order. Default: sorted folder names / sorted labels."""
    group_column: str | None = None
    """Manifest column naming the patient (or other group) that must not span two splits."""
    val_fraction: float = 0.2
    image_size: int | None = None
    """Square input size in pixels; null: the backbone's pretrained input size (224 for the ResNets,
    timm's pretrained config for ``timm:<name>``), set when the whole config is read."""
    num_workers: int = 4
    pipeline: Literal["gpu", "pil"] = "gpu"
    """``gpu``: decode each image once into an in-memory uint8 cache and augment whole batches on
    the training device (GPU, or CPU when training there). ``pil``: the methodology as usually
    written, PIL transforms per image in the loader workers, decoding every epoch (for comparison)."""
    cache_dir: str | None = None
    """data.pipeline=gpu: also keep the decoded images in this folder, keyed by file content, so
    later runs skip decoding; ``evaluate`` reads them too. Must be visible to every node; only the
    main process of a training run writes it."""
    node_cache_dir: str | None = None
    """data.pipeline=gpu with several processes: where each node's local main process writes the
    decoded images once for the node's other ranks to map (one copy in memory per node, not per
    rank; removed as soon as every rank has mapped it). Default: the temp dir (``$TMPDIR``, on
    SLURM usually node-local); must be local to the node, not shared."""
    alpha_background: list[int] = field(default_factory=lambda: [124, 116, 104])
    """RGB colour that transparent pixels are composited onto (the ImageNet mean: neutral after
    normalisation). Real conjunctiva crops are RGBA with the mask in alpha."""
    path_column: str = "path"
    """Manifest column with the image path (relative to the CSV's folder) or an image ID: a value
    that is not a file is looked up by file name, with or without extension, under the CSV's folder."""
    label_column: str = "label"
    """Manifest column with the class name (unused when data.measure_column is set)."""
    measure_column: str | None = None
    """Manifest column with a measurement (e.g. haemoglobin, g/dL) that sets the label:
    data.below_label when value < threshold, else data.above_label."""
    threshold: float | None = None
    """One threshold for every row (11.0 g/dL: WHO, children 6-59 months)."""
    threshold_column: str | None = None
    """Manifest column holding each row's threshold."""
    threshold_rules: list[ThresholdRule] = field(default_factory=list)
    """Thresholds by rule, e.g. by age and sex; the first matching rule wins."""
    below_label: str = "anemic"
    above_label: str = "non-anemic"
    site_column: str | None = None
    """Manifest column naming the site (e.g. hospital): each site lands in one split, so every
    validation fold holds out whole sites."""
    folds: int | None = None
    """Cross-validation folds over groups; default round(1 / val_fraction)."""
    fold: int = 0
    """Which fold (0 .. folds-1) is the validation split."""
    bad_files: Literal["error", "skip"] = "error"
    """Missing, unreadable, empty, non-image, truncated or too-small files, and images whose embedded
    colour profile cannot convert them to sRGB, and manifest rows with an empty data.measure_column:
    ``error`` stops before training with the full list;
    ``skip`` leaves them out and lists them in the run's excluded.csv."""
    min_size: int = 16
    """Images whose shorter side is below this many pixels are bad files."""
    near_duplicate_distance: int | None = 16
    """Images whose 256-bit difference hashes (dHash) differ in at most this many bits are near
    duplicates and share a split; null turns the check off. On CP-AnemiC, copies re-encoded or
    re-cut from one photo differ by 0-15 bits and no pair lies at 16-21; from 22 bits on, other
    photos of what may be the same eye mix with look-alike eyes, which only patient IDs separate."""
    near_copy_threshold: float | None = 0.10
    """Images within this ``near-copies-2`` distance (anemia_dist/near_copies.py: mirror/turn
    invariant, taken in the frame of each crop's mask, with a second stage for crops re-cut by hand)
    are near copies and share a split, beside the dHash pairs; null turns it off. 0.10 is set on a
    benchmark (docs/near-copies.md): recall 0.98 on made copies, 6e-5 of CP-AnemiC's distinct pairs merged."""
    copy_review: str | None = None
    """CSV of pairs reviewed by eye (columns a, b, verdict; a/b a file name, stem or path), or the name
    of a packaged one (``cp_anemic_review.csv``, which ``--config cp_anemic`` uses): rows whose verdict
    is ``copy`` join one copy group, for re-cuts no finder sees (docs/near-copies.md)."""
    duplicates: Literal["keep", "first"] = "keep"
    """``keep``: every copy trains, all copies in one split. ``first``: only the first file (by
    path) of each duplicate group is used, and groups with conflicting labels are left out."""

    def __post_init__(self) -> None:
        sources = [self.root is not None, self.manifest is not None]
        _check(sum(sources) <= 1, "data.root", "set data.root or data.manifest, not both")
        _check(
            self.val_root is None or self.val_manifest is None,
            "data.val_root",
            "set data.val_root or data.val_manifest, not both",
        )
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        _check(
            self.image_size is None or self.image_size >= 16,
            "data.image_size",
            f"must be at least 16 pixels, got {self.image_size}",
        )
        _check(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        if self.cache_dir is not None:
            _check(self.pipeline == "gpu", "data.cache_dir", "is only used with data.pipeline=gpu; unset it or switch")
            _check(not Path(self.cache_dir).is_file(), "data.cache_dir", f"{self.cache_dir!r} is a file; give a folder")
        _check(
            len(self.alpha_background) == 3 and all(0 <= c <= 255 for c in self.alpha_background),
            "data.alpha_background",
            f"must be three integers in 0..255, got {self.alpha_background}",
        )
        if self.classes is not None:
            _check(len(self.classes) >= 2, "data.classes", "needs at least two class names")
            _check(len(set(self.classes)) == len(self.classes), "data.classes", "class names must be unique")
        self._check_label_source()
        if self.folds is not None:
            _check(self.folds >= 2, "data.folds", f"must be at least 2, got {self.folds}")
        folds = self.fold_count
        _check(0 <= self.fold < folds, "data.fold", f"must be in 0..{folds - 1} (data.folds={folds}), got {self.fold}")
        _check(self.min_size >= 1, "data.min_size", f"must be >= 1, got {self.min_size}")
        if self.near_duplicate_distance is not None:
            _check(
                0 <= self.near_duplicate_distance <= 256,
                "data.near_duplicate_distance",
                f"must be in 0..256 bits or null, got {self.near_duplicate_distance}",
            )
        if self.near_copy_threshold is not None:
            _check(
                0 <= self.near_copy_threshold <= 1,
                "data.near_copy_threshold",
                f"must be in 0..1 or null, got {self.near_copy_threshold}",
            )
        if self.copy_review is not None:
            _check(
                review_path(self.copy_review).is_file(),
                "data.copy_review",
                f"{self.copy_review!r} is neither a file nor a packaged review ({PACKAGED_REVIEWS})",
            )
        manifest_only = ["measure_column", "site_column", "group_column"]
        for name in manifest_only:
            _check(
                getattr(self, name) is None or self.root is None,
                f"data.{name}",
                "needs a manifest CSV (data.manifest); an image folder has no columns",
            )

    def _check_label_source(self) -> None:
        sources = [self.threshold is not None, self.threshold_column is not None, bool(self.threshold_rules)]
        if self.measure_column is None:
            _check(
                not any(sources), "data.measure_column", "set it to use data.threshold/threshold_column/threshold_rules"
            )
            return
        _check(
            sum(sources) == 1,
            "data.threshold",
            "with data.measure_column set exactly one of data.threshold, data.threshold_column, data.threshold_rules",
        )
        _check(self.below_label != self.above_label, "data.below_label", "must differ from data.above_label")
        for i, rule in enumerate(self.threshold_rules):
            for j, condition in enumerate(rule.when):
                parse_condition(condition, f"data.threshold_rules[{i}].when[{j}]")

    @property
    def fold_count(self) -> int:
        """data.folds, or as many folds as make each validation fold about data.val_fraction."""
        return self.folds or max(2, round(1.0 / self.val_fraction))

    def require_source(self) -> None:
        _check(
            self.root is not None or self.manifest is not None,
            "data.root",
            "no training data: set data.root=FOLDER (one sub-folder per class) or data.manifest=FILE.csv",
        )


@dataclass
class ModelConfig:
    """The backbone and the classification head."""

    arch: str = "resnet50"
    """A torchvision ResNet, or ``timm:<name>`` for any timm backbone (docs/backbones.md)."""
    weights: str = "imagenet"
    """``imagenet`` (the pretrained weights from the local cache: torchvision's torch hub cache, or
    for timm backbones the Hugging Face hub cache), ``none`` (random init, for tests) or a path to
    a state dict (.safetensors / .pt)."""
    hidden: int = 512
    dropout: float = 0.5
    task: Literal["classify", "regress"] = "classify"
    """``classify``: the classes (the methodology). ``regress``: data.measure_column (haemoglobin,
    g/dL) standardised with the training split's mean and SD, one output, Huber loss; anemic when the
    predicted value is below the row's threshold (data.threshold/threshold_column/threshold_rules)."""

    def __post_init__(self) -> None:
        _check(
            self.arch in ARCHS or (self.arch.startswith(TIMM_PREFIX) and len(self.arch) > len(TIMM_PREFIX)),
            "model.arch",
            f"must be one of {', '.join(ARCHS)} or {TIMM_PREFIX}<timm model name>, got {self.arch!r}",
        )
        _check(self.hidden >= 1, "model.hidden", f"must be >= 1, got {self.hidden}")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")
        if self.weights not in ("imagenet", "none"):
            _check(
                Path(self.weights).is_file(),
                "model.weights",
                f"no such file {self.weights!r}; use imagenet, none or a path to a state dict",
            )


@dataclass
class OptimConfig:
    """Adam, as in the methodology."""

    lr: float = 1e-4
    weight_decay: float = 1e-4
    huber_delta: float = 1.0
    """model.task=regress: the Huber loss's delta, in standard deviations of the training targets."""

    def __post_init__(self) -> None:
        _check(self.lr >= 0, "optim.lr", f"must be >= 0, got {self.lr}")
        _check(self.huber_delta > 0, "optim.huber_delta", f"must be > 0, got {self.huber_delta}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")


@dataclass
class SchedulerConfig:
    """ReduceLROnPlateau on the global validation loss, stepped once per epoch."""

    factor: float = 0.5
    patience: int = 3
    min_lr: float = 1e-7

    def __post_init__(self) -> None:
        _check(0.0 < self.factor < 1.0, "scheduler.factor", f"must be in (0, 1), got {self.factor}")
        _check(self.patience >= 0, "scheduler.patience", f"must be >= 0, got {self.patience}")
        _check(self.min_lr >= 0, "scheduler.min_lr", f"must be >= 0, got {self.min_lr}")


@dataclass
class UnfreezeConfig:
    """When backbone stages join the training."""

    head_only_epochs: int = 5
    """Epochs that train the head alone: the listed layers train from epoch ``head_only_epochs + 1``
    on (formerly ``unfreeze.epoch``, still read with a warning)."""
    layers: list[str] = field(default_factory=lambda: [LAST_STAGE])
    """Backbone stages to unfreeze; ``last`` is the final one (ResNet: ``layer4``)."""
    plateau_patience: int | None = None
    """Unfreeze early when the validation loss has not improved for this many head-only epochs."""

    def __post_init__(self) -> None:
        _check(self.head_only_epochs >= 0, "unfreeze.head_only_epochs", f"must be >= 0, got {self.head_only_epochs}")
        if self.plateau_patience is not None:
            _check(self.plateau_patience >= 1, "unfreeze.plateau_patience", "must be >= 1 or null")


@dataclass
class EarlyStoppingConfig:
    patience: int = 5
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        _check(self.patience >= 1, "early_stopping.patience", f"must be >= 1, got {self.patience}")
        _check(self.min_delta >= 0, "early_stopping.min_delta", f"must be >= 0, got {self.min_delta}")


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 32
    """Per process: N processes see N x batch_size images per step."""
    seed: int = 42
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    """None: take it from ``accelerate launch`` / the accelerate config."""
    channels_last: bool = True
    """Channels-last (NHWC) convolution weights, and (data.pipeline=gpu) batches: the layout
    cuDNN's tensor cores and oneDNN run fastest. Checkpoints are saved contiguous either way."""
    sampler: Literal["shuffle", "balanced"] = "shuffle"
    """``shuffle``: every training image once per epoch, in a new order; ``balanced``: as many
    draws, with replacement, each class equally likely (:mod:`anemia_dist.sampling`)."""
    class_weights: Literal["balanced", "none"] = "balanced"
    """``balanced``: the loss weighs each class by n / (k * count), sklearn's 'balanced'; ``none``:
    unweighted (usual with ``sampler=balanced``, which balances the classes already)."""
    compile: bool = False
    """``torch.compile`` the model (in place: same state-dict keys; one training and one validation
    variant, compiled afresh once at the unfreeze). Pays on long GPU runs; the first steps wait
    for compilation."""
    deterministic: bool = False
    """Deterministic GPU kernels: cuDNN deterministic without autotuning, TF32 off, torch's
    deterministic algorithms where they exist (a warning names each that has none). Slower; on
    the CPU runs are reproducible without it."""
    collective_timeout_minutes: float = 60.0
    """How long a rank waits in a collective (NCCL's default is 10 minutes) while the main process
    works alone: the audit, the cache decode, the end-of-run report. Raise it for large datasets."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(
            self.collective_timeout_minutes > 0,
            "train.collective_timeout_minutes",
            f"must be > 0, got {self.collective_timeout_minutes}",
        )
        if self.sampler == "balanced" and self.class_weights == "balanced":
            warnings.warn(
                "train.sampler=balanced with train.class_weights=balanced corrects the class imbalance twice "
                "(the rare class is drawn more often and weighs more); usually train.class_weights=none",
                stacklevel=2,
            )


@dataclass
class RunConfig:
    output_dir: str = "runs"
    name: str | None = None
    """Run directory name under output_dir; default: a timestamp."""
    resume: str | None = None
    """``auto``: continue from the newest complete checkpoint in RUN/checkpoints (start fresh when
    there is none); a path: that checkpoint. Without it an existing run directory is an error."""

    def __post_init__(self) -> None:
        if self.resume not in (None, "auto"):
            _check(
                Path(self.resume).is_dir(),
                "run.resume",
                f"no such checkpoint directory {self.resume!r}; use auto or a path",
            )


@dataclass
class CheckpointConfig:
    """Full training state saved at the end of every epoch (and on preemption)."""

    keep_last: int = 2
    """Newest checkpoints kept (the best epoch's is kept too)."""

    def __post_init__(self) -> None:
        _check(self.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {self.keep_last}")


@dataclass
class EvalConfig:
    """The screening decision: which class is positive, and how its threshold is chosen.

    The threshold is chosen on the validation split, saved in ``best/meta.json`` and used
    unchanged by ``evaluate`` and ``predict``: it is never re-tuned on test data.
    """

    positive_class: str = "anemic"
    """The class screened for; matched case-insensitively against the class names."""
    threshold_rule: Literal["youden", "sensitivity", "fixed"] = "youden"
    """``youden``: maximise sensitivity + specificity - 1; ``sensitivity``: the highest threshold
    whose validation sensitivity reaches ``target_sensitivity``; ``fixed``: ``fixed_threshold``."""
    target_sensitivity: float = 0.90
    fixed_threshold: float = 0.5
    calibrate: bool = False
    """Fit a softmax temperature on the validation split and save it with the model
    (model.task=regress: a linear recalibration of the predicted values)."""
    bootstrap: int = 2000
    """Bootstrap resamples for the 95 % confidence intervals in the reports."""
    hb_thresholds: list[float] = field(default_factory=list)
    """model.task=regress: extra cut-offs (g/dL) reported beside the row thresholds, e.g. [7, 9, 11]
    for severe, moderate and mild anemia."""
    interval: float = 0.9
    """model.task=regress: coverage of the per-image prediction intervals (split-conformal,
    calibrated on the validation residuals, patients counted once)."""
    prevalence: float | None = None
    """A screening prevalence (e.g. 0.2) at which studies also report PPV and NPV, from the
    sensitivity and specificity; default: only at the data's own prevalence."""

    def __post_init__(self) -> None:
        _check(bool(self.positive_class.strip()), "eval.positive_class", "must name a class, e.g. anemic")
        _check(
            0.0 < self.target_sensitivity <= 1.0,
            "eval.target_sensitivity",
            f"must be in (0, 1], got {self.target_sensitivity}",
        )
        _check(
            0.0 <= self.fixed_threshold <= 1.0, "eval.fixed_threshold", f"must be in [0, 1], got {self.fixed_threshold}"
        )
        _check(self.bootstrap >= 100, "eval.bootstrap", f"must be >= 100 resamples, got {self.bootstrap}")
        _check(0.0 < self.interval < 1.0, "eval.interval", f"must be in (0, 1), got {self.interval}")
        if self.prevalence is not None:
            _check(0.0 < self.prevalence < 1.0, "eval.prevalence", f"must be in (0, 1) or null, got {self.prevalence}")


WANDB_MODES = ("off", "online", "offline")


@dataclass
class TrackingConfig:
    """Experiment trackers, through Accelerate's trackers on the main process (see tracking.py)."""

    log_with: list[Literal["wandb", "mlflow", "tensorboard"]] = field(default_factory=list)
    """Any of wandb, mlflow, tensorboard: each gets the config, every epoch's row and the outcome.
    ``tracking.wandb=online`` or ``offline`` adds wandb."""
    wandb: str | bool = "off"
    """W&B's mode: ``off``, ``online`` or ``offline`` (YAML reads a bare ``off`` as false; that
    means off too); ``off`` with wandb in tracking.log_with means online. ``online`` without a key
    or network falls back to offline with a message. A set WANDB_MODE environment variable wins,
    as everywhere in W&B (``WANDB_MODE=offline`` on compute nodes)."""
    project: str = "anemia-dist"
    """W&B project and MLflow experiment."""
    entity: str | None = None
    """W&B user or team; default: the key's default entity."""
    run_name: str | None = None
    """Display name in W&B and MLflow; default: run.name."""
    group: str | None = None
    """W&B run group: the fold runs of a study share the study's name."""
    tags: list[str] = field(default_factory=list)
    """W&B tags; in MLflow, tags named so with the value ``true``."""
    mlflow_uri: str | None = None
    """MLflow tracking URI: a server (``http://host:5000``) or a store (``sqlite:///path/mlflow.db``).
    Default: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///RUN.OUTPUT_DIR/mlflow.db``, one store for
    the runs there. An unreachable server stops the run before it trains."""
    tensorboard_dir: str | None = None
    """Folder shared by runs: TensorBoard event files go to TENSORBOARD_DIR/RUN.NAME. Default:
    RUN/tensorboard (``tensorboard --logdir RUN.OUTPUT_DIR`` finds every run)."""

    def __post_init__(self) -> None:
        if self.wandb is False:
            self.wandb = "off"
        _check(self.wandb in WANDB_MODES, "tracking.wandb", f"must be off, online or offline, got {self.wandb!r}")
        _check(
            len(set(self.log_with)) == len(self.log_with),
            "tracking.log_with",
            f"names a tracker twice: {self.log_with}",
        )
        _check(
            bool(self.project.strip()) and not any(c in self.project for c in "/\\#?%:"),
            "tracking.project",
            f"must be a non-empty name without / \\ # ? % :, got {self.project!r}",
        )
        for i, tag in enumerate(self.tags):
            _check(0 < len(tag) <= 64, f"tracking.tags[{i}]", f"W&B tags are 1 to 64 characters, got {tag!r}")


@dataclass
class StudyConfig:
    """``anemia-dist study``: cross-validation, each fold an ordinary run trained on the others."""

    folds: int = 5
    """Outer folds (study.by=folds): each held-out fold is a test fold, seen by nothing that trains."""
    by: Literal["folds", "site"] = "folds"
    """``folds``: stratified k-fold over split units (patients merged with their copies); ``site``:
    leave one site out (needs data.site_column)."""
    fold: int | None = None
    """Run only this fold (a SLURM array task); default: every fold not finished yet."""
    subgroups: list[str] = field(default_factory=list)
    """Manifest columns (one row per value) or conditions ``COLUMN OP VALUE`` for the subgroup table."""

    def __post_init__(self) -> None:
        _check(self.folds >= 2, "study.folds", f"must be at least 2, got {self.folds}")
        if self.fold is not None:
            _check(self.fold >= 0, "study.fold", f"must be >= 0 or null, got {self.fold}")
        for i, text in enumerate(self.subgroups):
            if CONDITION.match(text) is None:
                _check(bool(text.strip()), f"study.subgroups[{i}]", "empty subgroup; name a column or a condition")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    unfreeze: UnfreezeConfig = field(default_factory=UnfreezeConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    study: StudyConfig = field(default_factory=StudyConfig)

    def __post_init__(self) -> None:
        """``data.image_size=null`` becomes the backbone's pretrained input size. ResNet stages are
        known here: ``last`` becomes ``layer4`` and unknown names stop now (a timm backbone's are
        checked when it is built). model.task=regress needs data.measure_column."""
        if self.data.image_size is None:
            self.data.image_size = input_size(self.model.arch)
        _check(
            self.model.task == "classify" or self.data.measure_column is not None,
            "model.task",
            "regress learns data.measure_column: set it (e.g. data.measure_column=HB_LEVEL) and a threshold source",
        )
        if self.model.arch.startswith(TIMM_PREFIX):
            return
        layers = [BACKBONE_STAGES[-1] if name == LAST_STAGE else name for name in self.unfreeze.layers]
        unknown = [name for name in layers if name not in BACKBONE_STAGES]
        _check(
            not unknown,
            "unfreeze.layers",
            f"unknown stage(s) {unknown} of {self.model.arch}; choose from {list(BACKBONE_STAGES)} or {LAST_STAGE}",
        )
        self.unfreeze.layers = list(dict.fromkeys(layers))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- loading


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a type annotation, converting only where lossless (int -> float)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: got {value!r}, expected {annotation}")
    if origin is Literal:
        allowed = typing.get_args(annotation)
        _check(value in allowed, key, f"must be one of {list(allowed)}, got {value!r}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        _check(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        return [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        _check(isinstance(value, dict), key, f"expected a mapping of keys, got {value!r}")
        return _build(annotation, value, key)
    if annotation is bool:
        _check(isinstance(value, bool), key, f"expected true/false, got {value!r}")
        return value
    if annotation is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        _check(
            isinstance(value, (int, float)) and not isinstance(value, bool), key, f"expected a number, got {value!r}"
        )
        return float(value)
    if annotation is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {annotation} at {key}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else key
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
            raise ConfigError(f"{full}: unknown key{hint}; known keys here: {', '.join(names)}")
    kwargs = {key: _coerce(value, hints[key], f"{prefix}.{key}" if prefix else key) for key, value in values.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        _check(isinstance(child, dict), dotted, f"{part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (so ``3``, ``1e-4``, ``null``, ``[a, b]`` work)."""
    if "=" not in text:
        raise ConfigError(f"{text}: overrides look like section.key=value, e.g. train.epochs=10")
    key, raw = text.split("=", 1)
    key = key.strip()
    _check(bool(key), text, "empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"{key}: cannot read value {raw!r}: {error}") from None
    return key, value


def _rename_old_keys(tree: dict[str, Any]) -> None:
    """Move each old key of :data:`RENAMED_KEYS` to its new name, with a warning; both at once is an error."""
    for old, new in RENAMED_KEYS.items():
        (section, old_name), new_name = old.split("."), new.split(".")[1]
        values = tree.get(section)
        if not isinstance(values, dict) or old_name not in values:
            continue
        _check(new_name not in values, old, f"is the old name of {new}; set only {new}")
        warnings.warn(
            f"{old} is now called {new} (same meaning: the epochs that train the head alone); "
            f"the old name still works but will go, so write {new}={values[old_name]}",
            FutureWarning,
            stacklevel=3,
        )
        values[new_name] = values.pop(old_name)


PACKAGED_REVIEWS = "cp_anemic_review.csv"
"""Review CSVs shipped beside the packaged configs (``data.copy_review`` may name them)."""


def review_path(value: str) -> Path:
    """``data.copy_review``: a file path, or the name of a review CSV shipped with the configs."""
    path = Path(value)
    packaged = Path(str(resources.files("anemia_dist") / "configs" / path.name))
    return path if path.is_file() or not packaged.is_file() else packaged


def packaged_config(name: str) -> Path:
    return Path(str(resources.files("anemia_dist") / "configs" / f"{name}.yaml"))


def resolve_config_path(path_or_name: str) -> Path:
    """A file path, or the name of a packaged config (``default``, ``demo``)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    packaged = packaged_config(path_or_name)
    if packaged.is_file():
        return packaged
    names = sorted(p.stem for p in packaged.parent.glob("*.yaml"))
    raise ConfigError(f"--config: no such file {path_or_name!r} (packaged configs: {', '.join(names)})")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then ``key=value`` overrides; validated as a whole."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(str(path))
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (data:, model:, ...)")
        tree = loaded
    for override in overrides:
        key, value = parse_override(override)
        _set_dotted(tree, key, value)
    _rename_old_keys(tree)
    return _build(Config, tree, "")
