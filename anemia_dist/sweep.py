"""Hyperparameter sweeps over config keys: a W&B sweep run by agents, or a local grid or random search.

A sweep file is a W&B sweep config whose parameters are dotted config keys, plus two keys of
ours that every trial shares: ``config`` (the base config file; relative to the sweep file, or a
packaged config name) and ``overrides`` (``key=value`` strings)::

    method: grid
    config: my.yaml
    overrides: [data.manifest=/data/sheet.csv, train.epochs=30]
    parameters:
      optim.lr: {values: [1.0e-4, 3.0e-4]}
      model.hidden: {values: [256, 512]}

Every trial is an ordinary ``accelerate launch -m anemia_dist train`` run, its parameters given
as ``key=value`` overrides formatted as the W&B agent formats them, and every trial's config is
validated before the first trial starts. The launcher's own arguments (processes, mixed
precision, an accelerate config file) come from ``--launch-args`` or ``$ANEMIA_DIST_LAUNCH_ARGS``.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import random
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import load_config, resolve_config_path
from .errors import ConfigError
from .run_dir import METRICS, SUMMARY

LAUNCH_ARGS_ENV = "ANEMIA_DIST_LAUNCH_ARGS"
"""``accelerate launch`` arguments of every trial (shell words), e.g. ``--num_processes 4``."""
OURS = ("config", "overrides", "seed")
"""Keys of a sweep file that are not W&B's: shared by all trials, never sent to W&B."""
WANDB_KEYS = ("method", "metric", "parameters", "run_cap", "early_terminate", "name", "description")
METHODS = ("grid", "random", "bayes")
LOCAL_METHODS = ("grid", "random")
DISTRIBUTIONS = ("uniform", "log_uniform_values", "int_uniform")
"""The distributions ``sweep run`` samples; a W&B sweep may use any of W&B's."""
METRIC = {"name": "best_val_loss", "goal": "minimize"}
"""What trials are ranked by: the summary's best validation loss (W&B reads it from the run summary)."""
SUMMARY_COLUMNS = ("best_val_loss", "best_epoch", "best_val_acc", "epochs_run", "stop_reason")
TRIALS_FILE = "trials.json"
TABLE_FILE = "trials.csv"


@dataclass
class Sweep:
    path: Path
    spec: dict[str, Any]
    """The W&B part of the file."""
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    seed: int = 0

    @property
    def parameters(self) -> dict[str, dict[str, Any]]:
        return self.spec["parameters"]

    @property
    def name(self) -> str:
        return str(self.spec.get("name") or self.path.stem)


def error(sweep_file: Path, where: str, message: str) -> ConfigError:
    return ConfigError(f"{sweep_file}: {where}: {message}")


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file; every problem names the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} not found")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as problem:
        raise ConfigError(f"{path}: not valid YAML: {problem}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping with method: and parameters:")
    unknown = sorted(set(loaded) - set(OURS) - set(WANDB_KEYS))
    if unknown:
        known = ", ".join((*WANDB_KEYS, *OURS))
        raise error(path, unknown[0], f"unknown key (known: {known}; program and command are written by sweep init)")
    spec = {k: v for k, v in loaded.items() if k not in OURS}
    if spec.get("method") not in METHODS:
        raise error(path, "method", f"must be one of {', '.join(METHODS)}, got {spec.get('method')!r}")
    parameters = spec.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise error(path, "parameters", "needs at least one config key, e.g. optim.lr: {values: [1.0e-4, 3.0e-4]}")
    for key, rule in parameters.items():
        _check_rule(path, key, rule)
    overrides = loaded.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise error(path, "overrides", "must be a list of key=value strings, e.g. [train.epochs=30]")
    seed = loaded.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise error(path, "seed", f"must be an integer, got {seed!r}")
    sweep = Sweep(path, spec, _base_config(path, loaded.get("config")), overrides, seed)
    _validate_values(sweep)
    return sweep


def _check_rule(path: Path, key: str, rule: Any) -> None:
    where = f"parameters.{key}"
    if not isinstance(rule, dict) or not ({"value", "values", "distribution"} & set(rule)):
        raise error(path, where, "give value: X, values: [X, Y] or distribution: with min: and max:")
    if "values" in rule and (not isinstance(rule["values"], list) or not rule["values"]):
        raise error(path, where, "values: must be a non-empty list")
    if any(v is None for v in rule.get("values", [rule.get("value", 0)])):
        raise error(path, where, "null is not a sweep value (W&B would pass the text None); leave the key out")
    if rule.get("distribution") in DISTRIBUTIONS and not {"min", "max"} <= set(rule):
        raise error(path, where, f"distribution {rule['distribution']} needs min: and max:")


def _base_config(path: Path, config: Any) -> str | None:
    """An absolute path (agents and array tasks start elsewhere): the file beside the sweep file,
    else as ``--config`` reads it (a path, or a packaged config name)."""
    if config is None:
        return None
    beside = path.parent / str(config)
    try:
        return str((beside if beside.is_file() else resolve_config_path(str(config))).resolve())
    except ConfigError as problem:
        raise error(path, "config", f"{problem}; relative paths are read from the sweep file's folder") from None


def _validate_values(sweep: Sweep) -> None:
    """Check every value a trial can get (each listed value, both range ends; for W&B's other
    distributions, the key) and write listed values back typed as the config reads them: YAML
    reads ``1e-4`` as text, and W&B should see a number."""
    base = trial_config(sweep, {}).to_dict()
    for key, rule in sweep.parameters.items():
        ends = _range_ends(rule)
        typed = [_current(trial_config(sweep, {key: value}).to_dict(), key) for value in ends or [_current(base, key)]]
        if "values" in rule:
            rule["values"] = typed
        elif "value" in rule:
            rule["value"] = typed[0]


def _current(values: dict[str, Any], key: str) -> Any:
    """The base config's value of a dotted key; for an unknown key, a value that makes the config
    validation name it."""
    for part in key.split("."):
        if not isinstance(values, dict) or part not in values:
            return "unknown"
        values = values[part]
    return values


def _range_ends(rule: dict[str, Any]) -> list[Any]:
    if "values" in rule:
        return list(rule["values"])
    if "value" in rule:
        return [rule["value"]]
    return [rule["min"], rule["max"]] if rule["distribution"] in DISTRIBUTIONS else []


def override(key: str, value: Any) -> str:
    """``key=value`` exactly as the W&B agent writes a parameter (``${args_no_hyphens}``)."""
    return f"{key}={value}"


def trial_overrides(sweep: Sweep, values: dict[str, Any]) -> list[str]:
    return [*sweep.overrides, *(override(key, value) for key, value in values.items())]


def trial_config(sweep: Sweep, values: dict[str, Any], extra: list[str] | tuple[str, ...] = ()):
    """The trial's validated config; a bad key or value names the sweep file and the key."""
    try:
        return load_config(sweep.config, [*trial_overrides(sweep, values), *extra])
    except ConfigError as problem:
        raise ConfigError(f"{sweep.path}: {problem}") from None


def local_trials(sweep: Sweep) -> list[dict[str, Any]]:
    """The trials of ``sweep run``: a grid in file order, or ``run_cap`` random draws seeded by ``seed``."""
    method, cap = sweep.spec["method"], sweep.spec.get("run_cap")
    if method not in LOCAL_METHODS:
        raise error(sweep.path, "method", f"{method} needs the W&B server: use `anemia-dist sweep init`")
    for key, rule in sweep.parameters.items():
        if "distribution" in rule and "values" not in rule and "value" not in rule:
            if method == "grid":
                raise error(sweep.path, f"parameters.{key}", "a grid needs values: (a list), not a distribution")
            if rule["distribution"] not in DISTRIBUTIONS:
                raise error(
                    sweep.path,
                    f"parameters.{key}",
                    f"sweep run samples {', '.join(DISTRIBUTIONS)}; {rule['distribution']} needs sweep init",
                )
    keys = list(sweep.parameters)
    if method == "grid":
        grid = itertools.product(*(_range_ends(sweep.parameters[k]) for k in keys))
        trials = [dict(zip(keys, combination, strict=True)) for combination in grid]
        return trials[:cap] if cap else trials
    if not cap:
        raise error(sweep.path, "run_cap", "a random search needs run_cap: N, the number of trials")
    rng = random.Random(sweep.seed)
    return [{k: _draw(sweep.parameters[k], rng) for k in keys} for _ in range(cap)]


def _draw(rule: dict[str, Any], rng: random.Random) -> Any:
    if "value" in rule:
        return rule["value"]
    if "values" in rule:
        return rng.choice(rule["values"])
    low, high = rule["min"], rule["max"]
    if rule["distribution"] == "int_uniform":
        return rng.randint(int(low), int(high))
    if rule["distribution"] == "log_uniform_values":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.uniform(low, high)


def launch_args(given: str | None = None) -> list[str]:
    return shlex.split(given if given is not None else os.environ.get(LAUNCH_ARGS_ENV, ""))


def train_command(launch: list[str], config: str | None, overrides: list[str]) -> list[str]:
    """``accelerate launch [launch] -m anemia_dist train [--config C] overrides``, through this interpreter."""
    base = ["--config", config] if config else []
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launch,
        "-m",
        "anemia_dist",
        "train",
        *base,
        *overrides,
    ]


# --------------------------------------------------------------------------- local search


def trial_name(index: int) -> str:
    return f"trial-{index:03d}"


def sweep_dir(sweep: Sweep, given: str | None) -> Path:
    """``--dir``, else ``run.output_dir/sweep-NAME`` of the base config."""
    if given:
        return Path(given)
    return Path(trial_config(sweep, {}).run.output_dir) / f"sweep-{sweep.name}"


def _fix_trials(directory: Path, sweep: Sweep, trials: list[dict[str, Any]]) -> None:
    """Write the trial list once; a rerun with a changed sweep file stops instead of mixing two sweeps."""
    record = {"sweep": str(sweep.path), "trials": [{"trial": trial_name(i), **t} for i, t in enumerate(trials)]}
    path = directory / TRIALS_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["trials"] != json.loads(json.dumps(record["trials"])):
            raise ConfigError(
                f"{sweep.path}: its trials differ from those in {path} (the sweep file changed); "
                f"give another --dir, or restore the file"
            )
        return
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, json.dumps(record, indent=2))


def _write_atomic(path: Path, text: str) -> None:
    """Array tasks write the same files at once: each writes its own copy and renames it into place."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(text)
    temporary.replace(path)


def run_local(
    sweep: Sweep, directory: Path, trial: int | None, launch: list[str], dry_run: bool = False
) -> tuple[int, list[dict[str, Any]]]:
    """Run the trials (or only ``trial``) in sequence, skipping finished ones; returns the exit
    status (0: all ran to the end; 75: a trial was preempted, rerun to continue it) and the table."""
    trials = local_trials(sweep)
    if trial is not None and not 0 <= trial < len(trials):
        raise ConfigError(f"--trial: {sweep.path} has trials 0..{len(trials) - 1}, got {trial}")
    placement = [
        (i, [f"run.output_dir={directory}", f"run.name={trial_name(i)}", "run.resume=auto"]) for i in range(len(trials))
    ]
    for i, extra in placement:
        trial_config(sweep, trials[i], extra)  # every trial's config, before the first starts
    chosen = [placement[trial]] if trial is not None else placement
    if dry_run:
        for i, extra in chosen:
            print(shlex.join(train_command(launch, sweep.config, [*trial_overrides(sweep, trials[i]), *extra])))
        return 0, []
    from .preemption import PREEMPTED_EXIT_CODE  # torch: not for `anemia-dist --help` or a W&B trial

    _fix_trials(directory, sweep, trials)
    status = 0
    for i, extra in chosen:
        name = trial_name(i)
        if (directory / name / SUMMARY).is_file():
            print(f"{name}: finished earlier, skipped", flush=True)
            continue
        command = train_command(launch, sweep.config, [*trial_overrides(sweep, trials[i]), *extra])
        print(f"{name}: {shlex.join(command)}", flush=True)
        code = subprocess.run(command).returncode
        if code == PREEMPTED_EXIT_CODE:
            status = code
            break
        if code != 0:
            print(f"{name}: exited with status {code}", file=sys.stderr, flush=True)
            status = 1
    table = ranked_table(directory, trials)
    _write_atomic(directory / TABLE_FILE, _csv_text(table))
    return status, table


def ranked_table(directory: Path, trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per trial, finished ones first by best validation loss, then the others in order."""
    rows = []
    for i, values in enumerate(trials):
        run = directory / trial_name(i)
        summary_file = run / SUMMARY
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        state = "finished" if summary else "incomplete" if (run / METRICS).is_file() else "not run"
        rows.append({"trial": trial_name(i), "status": state, **{c: summary.get(c) for c in SUMMARY_COLUMNS}, **values})

    def order(row: dict[str, Any]) -> tuple[bool, float]:
        loss = row["best_val_loss"]
        unranked = loss is None or not math.isfinite(loss)
        return unranked, 0.0 if unranked else loss

    ranked = sorted(rows, key=order)
    for rank, row in enumerate(ranked, 1):
        row["rank"] = rank if not order(row)[0] else None
    return [{"rank": row.pop("rank"), **row} for row in ranked]


def _csv_text(rows: list[dict[str, Any]]) -> str:
    from io import StringIO

    buffer = StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def format_table(rows: list[dict[str, Any]]) -> str:
    """The table as aligned text, numbers to 4 significant digits."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    columns = list(rows[0])
    cells = [[cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    lines = [columns, *cells]
    return "\n".join("  ".join(text.ljust(w) for text, w in zip(line, widths, strict=True)).rstrip() for line in lines)


# --------------------------------------------------------------------------- W&B


def wandb_config(sweep: Sweep) -> dict[str, Any]:
    """The W&B sweep config: the file's W&B keys, the metric trials are ranked by unless the file
    names one, and a command that runs each trial as ``anemia-dist sweep trial`` with the shared
    base config and overrides, then the trial's parameters as ``key=value``."""
    base = ["--config", sweep.config] if sweep.config else []
    return {
        "metric": dict(METRIC),
        **sweep.spec,
        "program": "anemia_dist",
        "command": ["${env}", "${interpreter}", "-m", "${program}", "sweep", "trial", *base, *sweep.overrides]
        + ["${args_no_hyphens}"],
    }


def wandb_trial_command(config: str | None, overrides: list[str], launch: list[str]) -> list[str]:
    """The training run of one W&B trial, in ``RUN.OUTPUT_DIR/sweep-ID/RUN_ID`` and logging to that run."""
    sweep_id, run_id = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if not sweep_id or not run_id:
        raise ConfigError(
            "sweep trial: WANDB_SWEEP_ID or WANDB_RUN_ID is not set; trials are started by a W&B agent "
            "(slurm/sweep_agent.sbatch, or `wandb agent SWEEP_ID`)"
        )
    output = load_config(config, overrides).run.output_dir
    where = [f"run.output_dir={Path(output) / f'sweep-{sweep_id}'}", f"run.name={run_id}", "run.resume=auto"]
    return train_command(launch, config, [*overrides, *where, "tracking.wandb=online"])


def create_wandb_sweep(sweep: Sweep) -> str:
    """Create the sweep on the W&B server (project and entity from the base config); returns
    ``entity/project/id``, what ``wandb agent`` takes."""
    import wandb

    tracking = trial_config(sweep, {}).tracking
    sweep_id = wandb.sweep(wandb_config(sweep), project=tracking.project, entity=tracking.entity)
    entity = tracking.entity or wandb.Api().default_entity
    return f"{entity}/{tracking.project}/{sweep_id}"


# --------------------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="sweep_command", required=True)
    init = sub.add_parser("init", help="create the W&B sweep; prints the id for slurm/sweep_agent.sbatch")
    init.add_argument("file", help="sweep file (YAML)")
    init.add_argument("--dry-run", action="store_true", help="print the W&B sweep config and create nothing")
    run = sub.add_parser("run", help="grid or random search without W&B, then a table ranked by best val loss")
    run.add_argument("file", help="sweep file (YAML)")
    run.add_argument("--trial", type=int, help="run only this trial (0-based), e.g. --trial $SLURM_ARRAY_TASK_ID")
    run.add_argument("--dir", help="sweep directory (default: RUN.OUTPUT_DIR/sweep-NAME)")
    run.add_argument("--launch-args", help=f"accelerate launch arguments of every trial (default: ${LAUNCH_ARGS_ENV})")
    run.add_argument("--dry-run", action="store_true", help="print the trials' commands and run nothing")
    trial = sub.add_parser("trial", help="one W&B trial as the agent starts it: accelerate launch ... train")
    trial.add_argument("--config", help="the sweep's base config")
    trial.add_argument("overrides", nargs="*", help="the sweep's overrides, then the trial's parameters")


def main(args) -> int:
    if args.sweep_command == "trial":
        command = wandb_trial_command(args.config, args.overrides, launch_args())
        print(f"anemia-dist sweep trial: {shlex.join(command)}", flush=True)
        os.execv(command[0], command)
    sweep = load_sweep(args.file)
    if args.sweep_command == "init":
        if args.dry_run:
            print(yaml.safe_dump(wandb_config(sweep), sort_keys=False), end="")
            return 0
        path = create_wandb_sweep(sweep)
        print(f"sweep {path}: start agents with `sbatch --array=0-3 slurm/sweep_agent.sbatch {path}`")
        return 0
    directory = sweep_dir(sweep, args.dir)
    status, table = run_local(sweep, directory, args.trial, launch_args(args.launch_args), args.dry_run)
    if table:
        print(format_table(table))
        print(f"table: {directory / TABLE_FILE}")
    return status
