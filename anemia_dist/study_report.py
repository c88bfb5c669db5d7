"""A study's pooled numbers: ``oof_predictions.csv`` and ``study.json`` from whatever folds are done.

Pooled over every out-of-fold prediction, each image decided at its own fold's frozen threshold:
the metrics of ``evaluate`` with 95 % intervals from a bootstrap over split units (patients merged
with their copies), mean and SD across folds, per-site rows with a heterogeneity figure (I²),
PPV/NPV at ``eval.prevalence``, and the subgroup table of ``study.subgroups``.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import tracking
from .config import CONDITION, Config, load_config
from .errors import DataError
from .metrics import (
    CONFIDENCE,
    METRICS,
    Predictions,
    bootstrap_metrics,
    confidence_intervals,
    group_codes,
    json_ready,
    point_metrics,
)
from .run_dir import CONFIG, FOLDS, OOF_PREDICTIONS, PREDICTIONS, STUDY_JSON, STUDY_PLAN, TEST_JSON, TEST_REPORT
from .sources import condition_holds, read_manifest
from .study_hb import HB_ACROSS_FOLDS, HB_OOF_COLUMNS, hb_study, hb_subgroups, write_hb_study_page
from .tasks import REGRESS

RANKING = ("loss", "auroc", "auprc", "brier", "ece")
"""Metrics of the probabilities; the others are of the decisions (each fold's own threshold)."""
ACROSS_FOLDS = ("auroc", "sensitivity", "specificity")
OOF_COLUMNS = ["path", "label", "group", "site", "fold", "probability", "prediction"]
Z95 = 1.959963984540054


# --------------------------------------------------------------------------- pooled metrics


def pooled_predictions(truth: np.ndarray, score: np.ndarray, decided: np.ndarray, units: Sequence[str]):
    """Two views of the same images: scores for the ranking metrics, the decisions (as 0/1 scores at
    threshold 0.5) for the rest; equal unit codes make both bootstraps draw the same resamples."""
    codes = group_codes(units)
    eps = np.finfo(np.float64).eps
    nll = -np.log(np.clip(np.where(truth, score, 1.0 - score), eps, 1.0))
    return Predictions(truth, score, nll, codes), Predictions(truth, decided.astype(np.float64), nll, codes)


def prevalence_values(sensitivity: Any, specificity: Any, prevalence: float) -> dict[str, Any]:
    """PPV and NPV from sensitivity and specificity at another prevalence (Bayes' rule)."""
    sens, spec, p = np.asarray(sensitivity, float), np.asarray(specificity, float), prevalence
    with np.errstate(divide="ignore", invalid="ignore"):
        ppv = sens * p / (sens * p + (1 - spec) * (1 - p))
        npv = spec * (1 - p) / (spec * (1 - p) + (1 - sens) * p)
    return {"ppv": ppv, "npv": npv}


def _interval(samples: np.ndarray) -> dict[str, Any]:
    defined = samples[np.isfinite(samples)]
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(defined, [tail, 100 - tail]) if len(defined) else (np.nan, np.nan)
    return {"low": float(low), "high": float(high)}


def pooled_metrics(
    truth: np.ndarray,
    score: np.ndarray,
    decided: np.ndarray,
    units: Sequence[str],
    resamples: int,
    prevalence: float | None = None,
) -> dict[str, Any]:
    """Every metric of ``evaluate`` with its interval, decisions as given (each fold's own threshold)."""
    ranked, decisions = pooled_predictions(truth, score, decided, units)
    by_score, by_decision = point_metrics(ranked, 0.5), point_metrics(decisions, 0.5)
    values = {name: (by_score if name in RANKING else by_decision)[name] for name in METRICS}
    score_ci = confidence_intervals(ranked, 0.5, resamples, by_score)
    decision_ci = confidence_intervals(decisions, 0.5, resamples, by_decision)
    result: dict[str, Any] = {
        "n": len(truth),
        "n_positive": int(truth.sum()),
        "n_units": len(set(units)),
        **values,
        "confusion_matrix": {
            "true_positive": by_decision["tp"],
            "false_negative": by_decision["fn"],
            "false_positive": by_decision["fp"],
            "true_negative": by_decision["tn"],
        },
        "ci": {name: (score_ci if name in RANKING else decision_ci)[name] for name in METRICS},
    }
    if prevalence is not None:
        samples = bootstrap_metrics(decisions, 0.5, resamples)
        at = prevalence_values(samples["sensitivity"], samples["specificity"], prevalence)
        point = prevalence_values(values["sensitivity"], values["specificity"], prevalence)
        result["at_prevalence"] = {
            "prevalence": prevalence,
            **{name: float(point[name]) for name in at},
            "ci": {name: _interval(at[name]) for name in at},
        }
    return result


# --------------------------------------------------------------------------- across folds and sites


def across_folds(folds: Sequence[dict[str, Any]], names: Sequence[str] = ACROSS_FOLDS) -> dict[str, dict[str, Any]]:
    """Mean and sample SD of each fold's test AUROC, sensitivity and specificity (or the ``names`` given)."""
    out = {}
    for name in names:
        values = np.array([f[name] for f in folds if f.get(name) is not None], dtype=float)
        out[name] = {
            "mean": float(values.mean()) if len(values) else None,
            "sd": float(values.std(ddof=1)) if len(values) > 1 else None,
            "folds": len(values),
        }
    return out


def heterogeneity(estimates: Sequence[float | None], lows: Sequence[float | None], highs: Sequence[float | None]):
    """Cochran's Q and I² (Higgins & Thompson) across sites, each site's SE read off its 95 % interval."""
    rows = [
        (e, (h - lo) / (2 * Z95))
        for e, lo, h in zip(estimates, lows, highs, strict=True)
        if e is not None and lo is not None and h is not None and h > lo
    ]
    if len(rows) < 2:
        return {"sites": len(rows), "q": None, "i2": None, "tau2": None}
    estimate, se = np.array(rows).T
    weights = 1.0 / se**2
    pooled = float((weights * estimate).sum() / weights.sum())
    q = float((weights * (estimate - pooled) ** 2).sum())
    df = len(rows) - 1
    tau2 = max(0.0, (q - df) / (weights.sum() - (weights**2).sum() / weights.sum()))
    return {
        "sites": len(rows),
        "fixed_effect": pooled,
        "q": q,
        "i2": max(0.0, (q - df) / q) if q > 0 else 0.0,
        "tau2": tau2,
    }


def site_rows(folds: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per held-out site, and the heterogeneity of each metric across them."""
    rows = [
        {
            "site": f["name"],
            "n": f["n"],
            **{name: f[name] for name in ACROSS_FOLDS},
            "ci": {name: f["ci"][name] for name in ACROSS_FOLDS},
        }
        for f in folds
    ]
    figures = {
        name: heterogeneity(
            [r[name] for r in rows], [r["ci"][name]["low"] for r in rows], [r["ci"][name]["high"] for r in rows]
        )
        for name in ACROSS_FOLDS
    }
    return rows, figures


# --------------------------------------------------------------------------- subgroups


def subgroup_labels(cfg: Config, paths: Sequence[str]) -> dict[str, list[str | None]]:
    """For each study.subgroups entry, each image's subgroup (a column's value, or whether a condition
    holds), read from the study's manifest; None where the image is not in it."""
    if not cfg.study.subgroups:
        return {}
    if cfg.data.manifest is None:
        raise DataError("study.subgroups: subgroups come from manifest columns; the study has no data.manifest")
    samples, _ = read_manifest(cfg.data.manifest, cfg.data.classes, cfg.data.group_column, cfg.data)
    with Path(cfg.data.manifest).open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    by_path = {s.path: row for s, row in zip(samples, rows, strict=True)}
    out = {}
    for spec in cfg.study.subgroups:
        where = f"study.subgroups: {spec!r}"
        if CONDITION.match(spec):
            out[spec] = [
                None if p not in by_path else ("yes" if condition_holds(by_path[p], spec, where) else "no")
                for p in paths
            ]
        else:
            if rows and spec not in rows[0]:
                raise DataError(f"{where}: {cfg.data.manifest} has no column {spec!r}; it has {list(rows[0])}")
            out[spec] = [by_path[p][spec].strip() if p in by_path else None for p in paths]
    return out


def subgroup_table(
    labels: dict[str, list[str | None]],
    truth: np.ndarray,
    score: np.ndarray,
    decided: np.ndarray,
    units: Sequence[str],
    resamples: int,
) -> list[dict[str, Any]]:
    """Per subgroup: n, positives, sensitivity and specificity with intervals (pooled, bootstrap over units)."""
    table = []
    for spec, values in labels.items():
        for value in sorted({v for v in values if v is not None}):
            keep = np.array([v == value for v in values])
            kept_units = [u for u, k in zip(units, keep, strict=True) if k]
            result = pooled_metrics(truth[keep], score[keep], decided[keep], kept_units, resamples)
            table.append(
                {
                    "subgroup": spec,
                    "value": value,
                    "n": result["n"],
                    "n_positive": result["n_positive"],
                    **{name: result[name] for name in ("sensitivity", "specificity", "auroc")},
                    "ci": {name: result["ci"][name] for name in ("sensitivity", "specificity", "auroc")},
                }
            )
    return table


# --------------------------------------------------------------------------- the study


def read_folds(study_dir: Path) -> list[dict[str, str]]:
    path = Path(study_dir) / FOLDS
    if not path.is_file():
        raise DataError(f"{path}: not a study directory (no {FOLDS}); run `anemia-dist study` first")
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def read_oof(study_dir: Path, plan_rows: Sequence[dict[str, str]], names: Sequence[str]) -> tuple[list, list]:
    """Out-of-fold rows of every done fold, and each done fold's test record."""
    row_of = {row["path"]: row for row in plan_rows}
    oof, folds = [], []
    for fold, name in enumerate(names):
        directory = Path(study_dir) / f"fold-{fold}"
        if not (directory / TEST_JSON).is_file():
            continue
        record = json.loads((directory / TEST_JSON).read_text())
        folds.append({"fold": fold, "name": name, **record})
        with (directory / TEST_REPORT / PREDICTIONS).open(newline="") as handle:
            for row in csv.DictReader(handle):
                planned = row_of[row["path"]]
                oof.append({**row, **{k: planned[k] for k in ("group", "site", "unit")}, "fold": str(fold)})
    return oof, folds


def write_oof(path: Path, rows: Sequence[dict[str, str]], columns: Sequence[str] = OOF_COLUMNS) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def record_in_trackers(cfg: Config, study_dir: Path, study: dict[str, Any]) -> None:
    """W&B: the pooled numbers (and mean ± SD across folds) as the summary of a run in the folds' group."""
    name = study["study"]
    pooled_cfg = copy.deepcopy(cfg)
    pooled_cfg.run = dataclasses.replace(cfg.run, output_dir=str(study_dir.parent), name=study_dir.name)
    pooled_cfg.tracking = dataclasses.replace(cfg.tracking, group=name, run_name=f"{name}/pooled")
    values = {f"pooled/{k}": v for k, v in study["pooled"].items() if isinstance(v, (int, float))}
    values |= {f"pooled/{k}": v["value"] for k, v in study["pooled"].get("agreement", {}).items()}  # regression
    values |= {f"across_folds/{k}/{s}": v for k, d in study["across_folds"].items() for s, v in d.items()}
    values |= {"folds_done": study["folds_done"], "folds_planned": study["folds_planned"]}
    tracking.record_summary_run(pooled_cfg, values)


FOLD_KEYS = ("fold", "name", "n", "n_positive", "n_patients", "threshold", "threshold_rule", "temperature", "ci")


def pool_study(study_dir: Path, cfg: Config | None = None) -> dict[str, Any]:
    """``oof_predictions.csv``, ``study.json`` and ``report/study.html`` from the folds done so far."""
    from .study_page import write_study_page

    study_dir = Path(study_dir)
    cfg = cfg or load_config(study_dir / CONFIG)
    plan = json.loads((study_dir / STUDY_PLAN).read_text())
    oof, folds = read_oof(study_dir, read_folds(study_dir), plan["names"])
    if not folds:
        raise DataError(f"{study_dir}: no fold is done yet (no fold-K/{TEST_JSON}); run `anemia-dist study` first")
    if folds[0].get("task") == REGRESS:
        return pool_hb_study(study_dir, cfg, plan, oof, folds)
    write_oof(study_dir / OOF_PREDICTIONS, oof)
    positive = folds[0]["positive_class"]
    truth = np.array([row["label"] == positive for row in oof])
    score = np.array([float(row["probability"]) for row in oof])
    decided = np.array([row["prediction"] == positive for row in oof])
    units = [row["unit"] for row in oof]
    pooled = pooled_metrics(truth, score, decided, units, cfg.eval.bootstrap, cfg.eval.prevalence)
    per_fold = [{k: f[k] for k in FOLD_KEYS if k in f} | {m: f[m] for m in METRICS} for f in folds]
    if cfg.eval.prevalence is not None:
        for entry in per_fold:
            at = prevalence_values(entry["sensitivity"], entry["specificity"], cfg.eval.prevalence)
            entry["at_prevalence"] = {"prevalence": cfg.eval.prevalence, **{k: float(v) for k, v in at.items()}}
    study = {
        "study": cfg.run.name or study_dir.name,
        "by": plan["by"],
        "classes": plan["classes"],
        "positive_class": positive,
        "folds_planned": len(plan["names"]),
        "folds_done": len(folds),
        "flow": plan["flow"],
        "pooled": pooled,
        "across_folds": across_folds(per_fold),
        "folds": per_fold,
        "confidence_level": CONFIDENCE,
        "bootstrap_resamples": cfg.eval.bootstrap,
        "interval_method": "percentile bootstrap over split units (patients merged with their copies)"
        if group_codes(units) is not None
        else "Wilson for proportions, bootstrap over images otherwise",
    }
    if plan["by"] == "site":
        study["sites"], study["heterogeneity"] = site_rows(per_fold)
    labels = subgroup_labels(cfg, [row["path"] for row in oof])
    study["subgroups"] = subgroup_table(labels, truth, score, decided, units, cfg.eval.bootstrap)
    study = json_ready(study)
    (study_dir / STUDY_JSON).write_text(json.dumps(study, indent=2) + "\n")
    record_in_trackers(cfg, study_dir, study)
    study["report"] = str(write_study_page(study_dir, study, oof, truth, score))
    return study


def pool_hb_study(
    study_dir: Path, cfg: Config, plan: dict[str, Any], oof: list[dict[str, str]], folds: list[dict[str, Any]]
) -> dict[str, Any]:
    """A regression study's ``oof_predictions.csv``, ``study.json`` and page: the pooled predicted Hb."""
    write_oof(study_dir / OOF_PREDICTIONS, oof, HB_OOF_COLUMNS)
    pooled, per_fold, arrays = hb_study(oof, folds, cfg.eval.hb_thresholds, cfg.eval.bootstrap)
    study = {
        "study": cfg.run.name or study_dir.name,
        "task": REGRESS,
        "by": plan["by"],
        "folds_planned": len(plan["names"]),
        "folds_done": len(folds),
        "flow": plan["flow"],
        "pooled": pooled,
        "across_folds": across_folds(per_fold, HB_ACROSS_FOLDS),
        "folds": per_fold,
        "confidence_level": CONFIDENCE,
        "bootstrap_resamples": cfg.eval.bootstrap,
        "interval_method": "percentile bootstrap over split units (patients merged with their copies)",
        "bias_definition": "predicted − measured, g/dL",
    }
    labels = subgroup_labels(cfg, [row["path"] for row in oof])
    study["subgroups"] = hb_subgroups(labels, arrays, [row["unit"] for row in oof], cfg.eval.bootstrap)
    study = json_ready(study)
    (study_dir / STUDY_JSON).write_text(json.dumps(study, indent=2) + "\n")
    record_in_trackers(cfg, study_dir, study)
    study["report"] = str(write_hb_study_page(study_dir, study, arrays))
    return study
