"""Screening metrics for one positive class: point estimates, 95 % intervals, the operating threshold.

Pure numpy on (labels, probabilities): no model, no files. The validation pass
(:mod:`anemia_dist.validation`) produces the inputs; training and ``evaluate`` both score them here.

Every metric is computed from per-sample weights, so the point estimate (all weights 1) and each
bootstrap resample (weights = how often a sample, or its patient, was drawn) go through the same
code, vectorised over a block of resamples. AUROC and AUPRC follow scikit-learn's definitions
(trapezoidal ROC area, step-wise average precision) and are tested against it; the curves drawn
in the report and the threshold rules use scikit-learn directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.stats import binomtest
from sklearn.metrics import roc_curve

from .config import EvalConfig
from .errors import ConfigError, DataError

CONFIDENCE = 0.95
ECE_BINS = 10
BOOTSTRAP_SEED = 0
METRICS = (
    "loss",
    "accuracy",
    "balanced_accuracy",
    "auroc",
    "auprc",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "brier",
    "ece",
)
# Proportions k / n of independent images: Wilson intervals fit them when no image shares a patient.
PROPORTIONS = {
    "accuracy": (("tp", "tn"), ("tp", "tn", "fp", "fn")),
    "sensitivity": (("tp",), ("tp", "fn")),
    "specificity": (("tn",), ("tn", "fp")),
    "ppv": (("tp",), ("tp", "fp")),
    "npv": (("tn",), ("tn", "fn")),
}
LOSS_DEFINITION = (
    "unweighted mean cross-entropy: the mean over images of -log p(true class), with the probabilities "
    "the decisions use (after temperature scaling when the model has one); not the class-weighted "
    "training loss"
)


def positive_index(classes: Sequence[str], positive_class: str) -> int:
    """The index of ``positive_class`` in ``classes``, matched case-insensitively."""
    matches = [i for i, name in enumerate(classes) if name.casefold() == positive_class.casefold()]
    if len(matches) != 1:
        found = "no class" if not matches else "several classes"
        raise ConfigError(
            f"eval.positive_class: {found} named {positive_class!r} (case-insensitive) among {list(classes)}; "
            f"set eval.positive_class to one of them"
        )
    return matches[0]


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T), computed from softmax(logits): log p differs from the logits by a constant."""
    if temperature == 1.0:
        return probs
    with np.errstate(divide="ignore"):
        scaled = np.log(probs) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def _nll(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per-sample -log p(true class), clipped like scikit-learn's ``log_loss``."""
    eps = np.finfo(probs.dtype).eps
    return -np.log(np.clip(probs[np.arange(len(labels)), labels], eps, 1.0))


def fit_temperature(labels: np.ndarray, probs: np.ndarray) -> float:
    """The temperature minimising the validation cross-entropy (Guo et al., 2017)."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    result = minimize_scalar(
        lambda log_t: _nll(labels, apply_temperature(probs, float(np.exp(log_t)))).mean(),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
    )
    return float(np.exp(result.x))


@dataclass
class Predictions:
    """Per-sample outcomes of the positive-versus-rest decision."""

    truth: np.ndarray
    """bool: the image belongs to the positive class."""
    score: np.ndarray
    """P(positive class), after temperature scaling."""
    nll: np.ndarray
    """-log p(true class): each image's cross-entropy."""
    groups: np.ndarray | None = None
    """Integer patient codes when some patients have several images; None when all are independent."""

    @classmethod
    def from_probs(
        cls,
        labels: Any,
        probs: Any,
        positive: int,
        temperature: float = 1.0,
        groups: Sequence[str] | None = None,
    ) -> Predictions:
        labels = np.asarray(labels, dtype=np.int64)
        probs = apply_temperature(np.asarray(probs, dtype=np.float64), temperature)
        return cls(labels == positive, probs[:, positive], _nll(labels, probs), group_codes(groups))

    def __len__(self) -> int:
        return len(self.truth)


def group_codes(groups: Sequence[str] | None) -> np.ndarray | None:
    """Integer codes for the patients, or None when every image is its own group."""
    if groups is None:
        return None
    unique, codes = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    return codes if len(unique) < len(codes) else None


# --------------------------------------------------------------------------- the metrics


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, NaN where the denominator is 0 (an undefined metric)."""
    out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    return np.divide(numerator, denominator, out=out, where=denominator > 0)


def ranking_areas(truth: np.ndarray, score: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision for each row of ``weights`` (resamples x samples).

    The ROC has one point per distinct score (ties move diagonally), as in scikit-learn; zero-weight
    samples add empty steps that change neither area.
    """
    order = np.argsort(-score, kind="stable")
    sorted_score = score[order]
    block_end = np.r_[sorted_score[1:] != sorted_score[:-1], True]
    w = weights[:, order]
    positive = truth[order]
    tp = np.cumsum(w * positive, axis=1)[:, block_end]
    fp = np.cumsum(w * ~positive, axis=1)[:, block_end]
    tpr = _divide(tp, tp[:, -1:])
    fpr = _divide(fp, fp[:, -1:])
    tpr, fpr = np.pad(tpr, ((0, 0), (1, 0))), np.pad(fpr, ((0, 0), (1, 0)))
    auroc = np.trapezoid(tpr, fpr, axis=1)
    recall_step = np.diff(tpr, axis=1)
    precision = _divide(tp, tp + fp)
    auprc = np.where(recall_step > 0, recall_step * np.nan_to_num(precision), 0.0).sum(axis=1)
    auprc[np.isnan(tpr[:, -1])] = np.nan
    return auroc, auprc


def metric_table(pred: Predictions, threshold: float, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric (and the confusion counts) for each row of ``weights`` (resamples x samples)."""
    truth, decision = pred.truth, pred.score >= threshold
    cells = {
        "tp": weights @ (truth & decision),
        "fp": weights @ (~truth & decision),
        "tn": weights @ (~truth & ~decision),
        "fn": weights @ (truth & ~decision),
    }
    tp, fp, tn, fn = (cells[k].astype(np.float64) for k in ("tp", "fp", "tn", "fn"))
    total = weights.sum(axis=1).astype(np.float64)
    sensitivity, specificity = _divide(tp, tp + fn), _divide(tn, tn + fp)
    bins = np.searchsorted(np.linspace(0.0, 1.0, ECE_BINS + 1)[1:-1], pred.score)  # calibration_curve's bins
    gap_per_bin = weights @ (np.eye(ECE_BINS)[bins] * (pred.score - truth)[:, None])
    auroc, auprc = ranking_areas(truth, pred.score, weights)
    table = {
        "loss": _divide(weights @ pred.nll, total),
        "accuracy": _divide(tp + tn, total),
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "auroc": auroc,
        "auprc": auprc,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "ppv": _divide(tp, tp + fp),
        "npv": _divide(tn, tn + fn),
        "f1": _divide(2 * tp, 2 * tp + fp + fn),
        "brier": _divide(weights @ (pred.score - truth) ** 2, total),
        "ece": _divide(np.abs(gap_per_bin).sum(axis=1), total),
    }
    return {**table, **cells}


def point_metrics(pred: Predictions, threshold: float) -> dict[str, Any]:
    """The metrics on the data as it is, NaN where undefined (e.g. AUROC with one class)."""
    table = metric_table(pred, threshold, np.ones((1, len(pred))))
    values: dict[str, Any] = {name: float(table[name][0]) for name in METRICS}
    values.update({cell: int(round(table[cell][0])) for cell in ("tp", "fp", "tn", "fn")})
    return values


# --------------------------------------------------------------------------- intervals


def bootstrap_weights(rng: np.random.Generator, n: int, groups: np.ndarray | None, resamples: int) -> np.ndarray:
    """Each row: how often each sample is drawn when patients (or images) are drawn with replacement."""
    codes = np.arange(n) if groups is None else groups
    units = int(codes.max()) + 1
    counts = rng.multinomial(units, np.full(units, 1.0 / units), size=resamples)
    return counts[:, codes].astype(np.float64)


def bootstrap_metrics(
    pred: Predictions, threshold: float, resamples: int, seed: int = BOOTSTRAP_SEED
) -> dict[str, np.ndarray]:
    """Each metric over ``resamples`` bootstrap resamples, drawn in blocks that bound the memory used."""
    rng = np.random.default_rng(seed)
    block = max(1, 2_000_000 // max(1, len(pred)))
    parts = []
    for start in range(0, resamples, block):
        weights = bootstrap_weights(rng, len(pred), pred.groups, min(block, resamples - start))
        parts.append(metric_table(pred, threshold, weights))
    return {name: np.concatenate([part[name] for part in parts]) for name in METRICS}


def wilson_interval(successes: int, trials: int) -> tuple[float, float]:
    interval = binomtest(successes, trials).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return float(interval.low), float(interval.high)


def confidence_intervals(
    pred: Predictions, threshold: float, resamples: int, values: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """95 % intervals: Wilson for proportions of independent images, else a percentile bootstrap.

    The bootstrap draws whole patients when ``pred.groups`` is set, so images of one patient
    stay together; resamples where a metric is undefined are left out of its interval.
    """
    values = values or point_metrics(pred, threshold)
    samples = bootstrap_metrics(pred, threshold, resamples)
    tail = 100 * (1 - CONFIDENCE) / 2
    bootstrap_method = "bootstrap over patients" if pred.groups is not None else "bootstrap over images"
    intervals = {}
    for name in METRICS:
        if pred.groups is None and name in PROPORTIONS:
            numerator, denominator = PROPORTIONS[name]
            successes, trials = sum(values[c] for c in numerator), sum(values[c] for c in denominator)
            low, high = wilson_interval(successes, trials) if trials else (np.nan, np.nan)
            intervals[name] = {"low": low, "high": high, "method": "wilson"}
            continue
        defined = samples[name][np.isfinite(samples[name])]
        low, high = np.percentile(defined, [tail, 100 - tail]) if len(defined) else (np.nan, np.nan)
        intervals[name] = {"low": float(low), "high": float(high), "method": bootstrap_method}
    return intervals


# --------------------------------------------------------------------------- the operating point


def choose_threshold(truth: np.ndarray, score: np.ndarray, cfg: EvalConfig) -> float:
    """The decision threshold (positive when score >= threshold) picked by ``cfg.threshold_rule``.

    ``youden``: the cut maximising sensitivity + specificity - 1 (the most specific one on ties).
    ``sensitivity``: the most specific cut whose sensitivity reaches ``cfg.target_sensitivity``.
    ``fixed``: ``cfg.fixed_threshold``. A rule picks the lowest validation score still called
    positive; the threshold lies halfway to the next lower score (or to 0), so the validation
    decisions do not hinge on the last digits of one image's score.
    """
    if cfg.threshold_rule == "fixed":
        return float(cfg.fixed_threshold)
    truth = np.asarray(truth, dtype=bool)
    require_both_classes(truth, cfg)
    fpr, tpr, cuts = roc_curve(truth, score, drop_intermediate=False)
    # cuts[0] is +inf (nothing positive); the others are the distinct scores, descending.
    fpr, tpr, cuts = fpr[1:], tpr[1:], cuts[1:]
    if cfg.threshold_rule == "youden":
        chosen = int(np.argmax(tpr - fpr))
    else:
        chosen = int(np.argmax(tpr >= cfg.target_sensitivity))
    below = cuts[chosen + 1] if chosen + 1 < len(cuts) else 0.0
    return float((cuts[chosen] + below) / 2)


def require_both_classes(truth: Any, cfg: EvalConfig) -> None:
    """A threshold rule other than ``fixed`` is fitted on validation images of both kinds."""
    truth = np.asarray(truth, dtype=bool)
    if cfg.threshold_rule != "fixed" and (truth.all() or not truth.any()):
        raise DataError(
            f"eval.threshold_rule={cfg.threshold_rule} needs validation images of both the positive class and "
            f"the others; found {int(truth.sum())} positive of {len(truth)}. Use eval.threshold_rule=fixed "
            f"or a validation set with both."
        )


@dataclass
class OperatingPoint:
    """What ``best/meta.json`` holds for using the model as a screening test."""

    positive_class: str
    threshold: float
    threshold_rule: str
    temperature: float = 1.0

    @classmethod
    def fit(cls, labels: Any, probs: Any, classes: Sequence[str], cfg: EvalConfig) -> OperatingPoint:
        """Temperature (when ``cfg.calibrate``), then the threshold on the calibrated scores."""
        positive = positive_index(classes, cfg.positive_class)
        temperature = fit_temperature(np.asarray(labels), np.asarray(probs)) if cfg.calibrate else 1.0
        pred = Predictions.from_probs(labels, probs, positive, temperature)
        rule = {"sensitivity": f"sensitivity>={cfg.target_sensitivity:g}", "fixed": "fixed"}.get(
            cfg.threshold_rule, cfg.threshold_rule
        )
        return cls(classes[positive], choose_threshold(pred.truth, pred.score, cfg), rule, temperature)

    def to_meta(self) -> dict[str, Any]:
        return {
            "positive_class": self.positive_class,
            "threshold": self.threshold,
            "threshold_rule": self.threshold_rule,
            "temperature": self.temperature,
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any], where: str) -> OperatingPoint:
        missing = [key for key in ("positive_class", "threshold", "threshold_rule") if key not in meta]
        if missing:
            raise ConfigError(
                f"{where}: meta.json has no {', '.join(missing)}: this model was saved without an operating "
                f"threshold; retrain it with this version so the threshold is chosen on its validation split"
            )
        temperature = float(meta.get("temperature", 1.0))
        return cls(meta["positive_class"], float(meta["threshold"]), meta["threshold_rule"], temperature)

    def predictions(
        self, labels: Any, probs: Any, classes: Sequence[str], groups: Sequence[str] | None = None
    ) -> Predictions:
        return Predictions.from_probs(labels, probs, classes.index(self.positive_class), self.temperature, groups)


def negative_name(classes: Sequence[str], positive_class: str) -> str:
    others = [c for c in classes if c != positive_class]
    return others[0] if len(others) == 1 else f"not {positive_class}"


@dataclass
class Evaluation:
    result: dict[str, Any]
    """JSON-ready: undefined metrics are None."""
    pred: Predictions
    uncalibrated: Predictions | None = None
    """The predictions before temperature scaling, when the model has a temperature."""


def summarize(
    labels: Any,
    probs: Any,
    classes: Sequence[str],
    point: OperatingPoint,
    resamples: int,
    groups: Sequence[str] | None = None,
) -> Evaluation:
    """Every metric with its interval at the saved operating point, and the predictions behind them."""
    pred = point.predictions(labels, probs, classes, groups)
    values = point_metrics(pred, point.threshold)
    intervals = confidence_intervals(pred, point.threshold, resamples, values)
    result: dict[str, Any] = {
        "n": len(pred),
        "n_positive": int(pred.truth.sum()),
        "n_patients": int(pred.groups.max()) + 1 if pred.groups is not None else None,
        "positive_class": point.positive_class,
        "negative_class": negative_name(classes, point.positive_class),
        **{name: values[name] for name in METRICS},
        "threshold": point.threshold,
        "threshold_rule": point.threshold_rule,
        "temperature": point.temperature,
        "confusion_matrix": {
            "true_positive": values["tp"],
            "false_negative": values["fn"],
            "false_positive": values["fp"],
            "true_negative": values["tn"],
        },
        "ci": intervals,
        "confidence_level": CONFIDENCE,
        "bootstrap_resamples": resamples,
        "loss_definition": LOSS_DEFINITION,
    }
    uncalibrated = None
    if point.temperature != 1.0:
        uncalibrated = Predictions.from_probs(labels, probs, classes.index(point.positive_class))
        result["ece_uncalibrated"] = point_metrics(uncalibrated, point.threshold)["ece"]
    return Evaluation(json_ready(result), pred, uncalibrated)


def screening_metrics(
    labels: Any, probs: Any, classes: Sequence[str], cfg: EvalConfig
) -> tuple[OperatingPoint, dict[str, float]]:
    """The operating point fitted on these validation predictions (what this epoch's model would be
    saved with), and the screening metrics at it: one training epoch's ``val_*`` columns."""
    point = OperatingPoint.fit(labels, probs, classes, cfg)
    values = point_metrics(point.predictions(labels, probs, classes), point.threshold)
    return point, {name: values[name] for name in METRICS if name not in ("loss", "accuracy")} | {
        "threshold": point.threshold
    }


def json_ready(value: Any) -> Any:
    """NaN (an undefined metric) becomes None, which JSON can hold."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
