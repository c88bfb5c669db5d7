"""Cross-validation studies: ``anemia-dist study`` deals the data into test folds, trains each fold as
an ordinary run on the other folds and scores it on its own test fold.

The plan (which image is tested in which fold) is made once, on the main process, from the audit's
split units (patients merged with their copies, near copies and, with data.site_column, sites), so
every distinct image lands in exactly one test fold and no unit straddles two. A fold trains on a
manifest of the other folds only: its validation split (early stopping, plateau scheduler,
unfreezing, temperature, threshold) is carved from that manifest by the ordinary split rules, so
the test fold cannot reach a single decision. A fold whose ``test.json`` exists is done and never
trained again; an interrupted fold resumes from its checkpoints (``run.resume=auto``).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import os
import socket
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import PartialState
from accelerate.logging import get_logger
from accelerate.utils import parse_flag_from_env
from sklearn.model_selection import StratifiedGroupKFold

from .audit import audit_data
from .config import Config
from .distributed import decided_on_main
from .errors import ConfigError, DataError
from .run_dir import BEST, CONFIG, FOLDS, STUDY_PLAN, SUMMARY, TEST_DATA, TEST_JSON, TEST_REPORT, TRAIN_DATA
from .sources import Sample
from .splits import MEASURE_COLUMN, THRESHOLD_COLUMN, assign_units, audit_exclusions
from .tasks import REGRESS

logger = get_logger(__name__)

FORK_LAUNCHED = "FORK_LAUNCHED"
"""Accelerate's flag for processes it did not start: it then never destroys their process group."""

FOLD_COLUMNS = ["path", "label", "group", "site", "unit", "fold"]
"""The columns of ``folds.csv``; a fold's manifests hold the first four."""
HB_COLUMNS = [MEASURE_COLUMN, THRESHOLD_COLUMN]
"""model.task=regress: ``folds.csv`` and every fold's manifests also hold each image's Hb and threshold."""


@dataclass
class StudyPlan:
    """Which image is tested in which fold, and the counts behind it (``study_plan.json``)."""

    classes: list[str]
    by: str
    names: list[str]
    """One per fold: ``fold-K``, or the held-out site for study.by=site."""
    rows: list[dict[str, str]]
    """Every image used: FOLD_COLUMNS."""
    flow: dict[str, Any]
    """Files found, left out (by reason), used, split units, and images per test fold."""

    def to_json(self) -> dict[str, Any]:
        return {"classes": self.classes, "by": self.by, "names": self.names, "flow": self.flow}


def fold_dir(study_dir: Path, fold: int) -> Path:
    return Path(study_dir) / f"fold-{fold}"


def fold_done(study_dir: Path, fold: int) -> bool:
    return (fold_dir(study_dir, fold) / TEST_JSON).is_file()


# --------------------------------------------------------------------------- the plan


def _check_study_data(cfg: Config) -> None:
    data = cfg.data
    if data.val_root is not None or data.val_manifest is not None:
        raise ConfigError(
            "data.val_root/data.val_manifest: a study makes its own test and validation splits from the data; "
            "drop the separate validation source (or add it to the manifest)"
        )
    if cfg.study.by == "site" and data.site_column is None:
        raise ConfigError("study.by=site: name the manifest's site column with data.site_column=COLUMN")


def _test_folds(kept: list[Sample], cfg: Config) -> tuple[list[int], list[str]]:
    """Each sample's test fold and the folds' names: one site each, or a stratified group k-fold over units."""
    if cfg.study.by == "site":
        names = sorted({s.site for s in kept})
        if len(names) < 2:
            raise DataError(f"study.by=site: the data has {len(names)} site(s) in {cfg.data.site_column!r}; need 2")
        sites_of = defaultdict(set)
        for s in kept:
            sites_of[s.unit].add(s.site)
        if any(len(sites) > 1 for sites in sites_of.values()):
            raise DataError("study.by=site: copies of an image sit at two sites; set data.duplicates=first")
        return [names.index(s.site) for s in kept], names
    folds, labels = cfg.study.folds, np.array([s.label for s in kept])
    units = np.array([s.unit for s in kept])
    for label in np.unique(labels):
        if len(np.unique(units[labels == label])) < folds:
            raise DataError(
                f"study.folds={folds}: a class spans fewer than {folds} split units (patients merged with their "
                f"copies{' and sites' if cfg.data.site_column else ''}); use fewer folds or add data"
            )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=cfg.train.seed)
    fold_of = np.empty(len(kept), dtype=int)
    for fold, (_, test) in enumerate(splitter.split(np.zeros(len(kept)), labels, units)):
        fold_of[test] = fold
    return fold_of.tolist(), [f"fold-{k}" for k in range(folds)]


def plan_study(cfg: Config) -> StudyPlan:
    """Audit, leave out by policy, merge units, deal the units into test folds: the same for a seed."""
    _check_study_data(cfg)
    samples, classes, report = audit_data(cfg.data)
    if any(s.split for s in samples):
        raise DataError(f"{cfg.data.manifest}: a study makes its own splits; drop the manifest's split column")
    excluded = audit_exclusions(cfg.data, report)
    kept = assign_units(
        samples, report, [i for i in range(len(samples)) if i not in excluded], bool(cfg.data.site_column)
    )
    if not kept:
        raise DataError("every file was excluded; see the audit (anemia-dist audit-data)")
    fold_of, names = _test_folds(kept, cfg)
    regress = cfg.model.task == REGRESS
    rows = [
        {"path": s.path, "label": classes[s.label], "group": s.group, "site": s.site, "unit": s.unit, "fold": str(k)}
        | ({MEASURE_COLUMN: repr(s.value), THRESHOLD_COLUMN: repr(s.threshold)} if regress else {})
        for s, k in zip(kept, fold_of, strict=True)
    ]
    flow = {
        "files_found": len(samples),
        "left_out": dict(sorted(Counter(reason for reason, _ in excluded.values()).items())),
        "images_used": len(kept),
        "split_units": len({s.unit for s in kept}),
        "patients": len({s.group for s in kept}),
        "images_per_fold": [fold_of.count(k) for k in range(len(names))],
    }
    return StudyPlan(classes, cfg.study.by, names, rows, flow)


def _write_atomic(path: Path, text: str) -> None:
    """Concurrent array tasks write the same plan: each replaces the file whole, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}")
    partial.write_text(text)
    os.replace(partial, path)


def _csv_text(rows: list[dict[str, str]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_plan(study_dir: Path, cfg: Config, plan: StudyPlan) -> None:
    """The plan and every fold's manifests; a rerun must find the plan it made before (same data, seed)."""
    hb = HB_COLUMNS if plan.rows and MEASURE_COLUMN in plan.rows[0] else []
    folds_text = _csv_text(plan.rows, FOLD_COLUMNS + hb)
    existing = Path(study_dir) / FOLDS
    if existing.is_file() and existing.read_text() != folds_text:
        raise DataError(
            f"{existing}: this study was planned on other data or another seed/study.by/study.folds; "
            f"choose another run.name or restore the data"
        )
    _write_atomic(Path(study_dir) / CONFIG, cfg.to_yaml())
    _write_atomic(Path(study_dir) / STUDY_PLAN, json.dumps(plan.to_json(), indent=2) + "\n")
    _write_atomic(existing, folds_text)
    manifest_columns = FOLD_COLUMNS[:4]  # the test manifest adds the unit: its intervals resample copies together
    for fold in range(len(plan.names)):
        train = [row for row in plan.rows if row["fold"] != str(fold)]
        test = [row for row in plan.rows if row["fold"] == str(fold)]
        _write_atomic(fold_dir(study_dir, fold) / TRAIN_DATA, _csv_text(train, manifest_columns + hb))
        _write_atomic(fold_dir(study_dir, fold) / TEST_DATA, _csv_text(test, FOLD_COLUMNS[:5] + hb))


# --------------------------------------------------------------------------- one fold


def inner_by_site(cfg: Config, plan: StudyPlan, fold: int) -> bool:
    """The validation split holds out whole sites too, where the training folds have enough sites for it."""
    if cfg.data.site_column is None:
        return False
    sites = {row["site"] for row in plan.rows if row["fold"] != str(fold)}
    return len(sites) >= cfg.data.fold_count


def fold_config(cfg: Config, plan: StudyPlan, study_dir: Path, fold: int) -> Config:
    """An ordinary training config on the fold's training manifest, resuming its own run directory."""
    fold_cfg = copy.deepcopy(cfg)
    regress = cfg.model.task == REGRESS  # the Hb and each row's threshold, as the plan wrote them
    fold_cfg.data = dataclasses.replace(
        cfg.data,
        root=None,
        manifest=str(fold_dir(study_dir, fold) / TRAIN_DATA),
        classes=list(plan.classes),
        path_column="path",
        label_column="label",
        group_column="group",
        site_column="site" if inner_by_site(cfg, plan, fold) else None,
        measure_column=MEASURE_COLUMN if regress else None,
        threshold=None,
        threshold_column=THRESHOLD_COLUMN if regress else None,
        threshold_rules=[],
        duplicates="keep",  # the plan has applied data.duplicates already
    )
    fold_cfg.run = dataclasses.replace(cfg.run, output_dir=str(study_dir), name=f"fold-{fold}", resume="auto")
    name = cfg.run.name or Path(study_dir).name
    fold_cfg.tracking = dataclasses.replace(
        cfg.tracking, group=name, run_name=f"{cfg.tracking.run_name or name}/{plan.names[fold]}"
    )
    return fold_cfg


def run_fold(cfg: Config, plan: StudyPlan, study_dir: Path, fold: int) -> dict[str, Any] | None:
    """Train the fold (or finish its training), then score its best model on its test fold (a regression
    model with :func:`~anemia_dist.hb_evaluation.evaluate_hb`: agreement, thresholds, intervals)."""
    from .hb_evaluation import evaluate_hb
    from .inference import evaluate
    from .trainer import train

    directory = fold_dir(study_dir, fold)
    if not (directory / SUMMARY).is_file():
        logger.info(f"study: training {plan.names[fold]} ({directory})", main_process_only=True)
        train(fold_config(cfg, plan, study_dir, fold))
    overrides = [
        "data.group_column=unit",
        f"data.num_workers={cfg.data.num_workers}",
        f"eval.bootstrap={cfg.eval.bootstrap}",
    ]
    # A regression model is scored by evaluate_hb (agreement, thresholds, intervals); a classifier with
    # the quality gate off, since the test fold was audited like the training data: every test image
    # is scored, exactly once.
    score = evaluate_hb if cfg.model.task == REGRESS else partial(evaluate, quality_gate=False)
    return score(
        directory / BEST,
        directory / TEST_DATA,
        overrides,
        batch_size=cfg.train.batch_size,
        out=directory / TEST_JSON,
        report_dir=directory / TEST_REPORT,
    )


def _plan_on_main(cfg: Config, is_main: bool) -> StudyPlan:
    return decided_on_main(lambda: plan_study(cfg), is_main)


@contextmanager
def process_group_kept(state: PartialState) -> Iterator[None]:
    """Each fold's ``end_training`` would destroy the process group the next fold trains in; Accelerate
    leaves it alone for fork-launched processes, so the folds run as such and the study ends it."""
    launched, flag = state.fork_launched, os.environ.get(FORK_LAUNCHED)
    os.environ[FORK_LAUNCHED] = "1"  # each Accelerator re-reads it
    state.fork_launched = True
    try:
        yield
    finally:
        state.fork_launched = launched
        if flag is None:
            os.environ.pop(FORK_LAUNCHED)
        else:
            os.environ[FORK_LAUNCHED] = flag


def run_study(cfg: Config) -> dict[str, Any] | None:
    """Every fold not done yet (or only study.fold), then the pooled study; the study on the main process."""
    from .study_report import pool_study

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator() reads it
    if not cfg.run.name:
        raise ConfigError("run.name: a study needs a name (its directory, and its W&B group); e.g. run.name=cv5")
    study_dir = Path(cfg.run.output_dir) / cfg.run.name
    plan = _plan_on_main(cfg, state.is_main_process)
    if state.is_main_process:
        write_plan(study_dir, cfg, plan)
    state.wait_for_everyone()
    if cfg.study.fold is not None and cfg.study.fold >= len(plan.names):
        raise ConfigError(f"study.fold: must be in 0..{len(plan.names) - 1} ({len(plan.names)} folds)")
    folds = range(len(plan.names)) if cfg.study.fold is None else [cfg.study.fold]
    with process_group_kept(state):
        for fold in folds:
            if fold_done(study_dir, fold):
                logger.info(f"study: {plan.names[fold]} is done; not trained again", main_process_only=True)
                continue
            run_fold(cfg, plan, study_dir, fold)
    result = None
    if cfg.study.fold is None and state.is_main_process:
        result = pool_study(study_dir, cfg)
    state.wait_for_everyone()
    state.destroy_process_group()
    return result
