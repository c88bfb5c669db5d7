"""``anemia-dist`` (= ``python -m anemia_dist``): one entry point, one sub-command per job.

Every sub-command's arguments are defined here and its module is imported only when it runs:
importing torch takes seconds, which ``--help``, ``sweep`` and the parent of every launch need not
wait for (tests/unit/test_cli.py checks that building the parser imports no torch).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import ARCHS, Config, DataConfig, ModelConfig, TrainConfig, load_config
from .console import configure_logging
from .errors import USER_ERRORS
from .run_dir import AUDIT_JSON, BEST, CONFIG, CURVES, METRICS, REPORT, REPORT_PAGE, SUMMARY
from .sweep import add_arguments as add_sweep_arguments


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _until_preempted(command: str, run: Callable[[Config], Any], cfg: Config) -> tuple[Any, int]:
    """``run(cfg)`` and exit status 0, or (None, 75) after a signal saved a checkpoint (SLURM requeues)."""
    from .preemption import PREEMPTED_EXIT_CODE, Preempted

    try:
        return run(cfg), 0
    except Preempted as preempted:
        print(f"anemia-dist {command}: {preempted}", file=sys.stderr)
        return None, PREEMPTED_EXIT_CODE


def cmd_train(args: argparse.Namespace) -> int:
    from .trainer import train

    summary, status = _until_preempted("train", train, load_config(args.config, args.overrides))
    if summary is not None and _is_main_rank():
        print(json.dumps(summary, indent=2))
    return status


def cmd_study(args: argparse.Namespace) -> int:
    from .study import run_study

    study, status = _until_preempted("study", run_study, load_config(args.config, args.overrides))
    if study is not None:
        print(study_summary(study))
    return status


KEYS = {"MAE": "mae", "CCC": "lin_ccc", "AUROC": "auroc"}
"""The summary's metric names, as study.json spells them."""


def study_summary(study: dict) -> str:
    """The pooled numbers in three lines, and where the rest is."""
    pooled, spread = study["pooled"], study["across_folds"]

    def shown(name: str) -> str:
        entry = pooled["agreement"][name] if regress else {"value": pooled[name], **pooled["ci"][name]}
        value = "undefined" if entry["value"] is None else f"{entry['value']:.3f}"
        return value + ("" if entry["low"] is None else f" ({entry['low']:.3f}-{entry['high']:.3f})")

    regress = "agreement" in pooled  # model.task=regress: the pooled predicted Hb
    names = ("MAE", "bias", "CCC") if regress else ("AUROC", "sensitivity", "specificity")
    sd = ", ".join(f"{k} {v['mean']:.3f} ± {(v['sd'] or 0.0):.3f}" for k, v in spread.items() if v["mean"] is not None)
    return (
        f"study {study['study']}: {study['folds_done']} of {study['folds_planned']} folds, {pooled['n']} images\n"
        f"  pooled {', '.join(f'{name} {shown(KEYS.get(name, name))}' for name in names)}\n"
        f"  across folds: {sd}\n  report: {study['report']}"
    )


def cmd_study_report(args: argparse.Namespace) -> int:
    from .study_report import pool_study

    overrides = args.overrides
    cfg = load_config(Path(args.study_dir) / CONFIG, overrides) if overrides else None
    print(study_summary(pool_study(Path(args.study_dir), cfg)))
    return 0


def launch_command(num_processes: int, program: list[str], port: int | None = None) -> list[str]:
    """``accelerate launch`` on one machine, as a user would type it, run through this interpreter."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1"]
    command += ["--num_processes", str(num_processes), "--mixed_precision", "no", "--dynamo_backend", "no"]
    if num_processes > 1:
        command.append("--multi_gpu")  # with ACCELERATE_USE_CPU=true this means N CPU ranks over gloo
    if port is not None:
        command += ["--main_process_port", str(port)]
    return command + program


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .demo import MANIFEST, make_synthetic_dataset

    output = Path(args.output_dir)
    manifest = output / "demo-data" / MANIFEST
    if not manifest.is_file():
        print(f"generating the synthetic dataset in {manifest.parent}")
        make_synthetic_dataset(manifest.parent)
    use_gpu = torch.cuda.is_available()
    processes = args.num_processes or (torch.cuda.device_count() if use_gpu else min(2, os.cpu_count() or 1))
    train_args = ["--config", "demo", f"data.manifest={manifest}", f"run.output_dir={output}", "run.name=demo"]
    run_dir = output / "demo"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    env = dict(os.environ)
    if not use_gpu:
        env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    command = launch_command(processes, ["-m", "anemia_dist", "train", *train_args, *args.overrides])
    shown = " ".join(["accelerate launch", *command[3:]])
    print(f"running: {'ACCELERATE_USE_CPU=true ' if not use_gpu else ''}{shown}", flush=True)
    result = subprocess.run(command, env=env)
    if result.returncode == 0:
        summary = json.loads((run_dir / SUMMARY).read_text())
        print(
            f"\ndemo finished: best epoch {summary['best_epoch']} of {summary['epochs_run']} "
            f"(val loss {summary['best_val_loss']:.4f}, val acc {summary['best_val_acc']:.3f}), "
            f"stop: {summary['stop_reason']}, {summary['world_size']} process(es).\n"
            f"run directory: {run_dir} ({METRICS}, {CURVES}, {BEST}/, {SUMMARY}, {REPORT}/{REPORT_PAGE})"
        )
    return result.returncode


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .hb_evaluation import evaluate_hb, is_regression
    from .inference import evaluate

    if is_regression(args.checkpoint):  # model.task=regress: agreement, thresholds, intervals
        record = evaluate_hb(
            args.checkpoint, args.data, args.overrides, args.batch_size, args.out, args.report, args.split
        )
    else:
        record = evaluate(
            args.checkpoint,
            args.data,
            args.overrides,
            args.batch_size,
            args.out,
            args.report,
            args.split,
            quality_gate=args.quality_gate,
        )
    if record is not None:
        print(json.dumps(record, indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .hb_evaluation import is_regression, predict_hb, write_hb_predictions
    from .inference import predict, write_predictions

    if is_regression(args.checkpoint):  # path, hb, hb_low, hb_high, anemic, error
        rows = predict_hb(args.checkpoint, args.inputs, args.batch_size, args.num_workers)
        write_predictions = write_hb_predictions
    else:
        rows = predict(args.checkpoint, args.inputs, args.batch_size, args.num_workers, args.quality_gate, args.explain)
    if args.out:
        with open(args.out, "w", newline="") as handle:
            write_predictions(rows, handle)
    else:
        write_predictions(rows, sys.stdout)
    unreadable = [row for row in rows if row["error"]]
    rejected = [row for row in rows if row.get("reason")]
    scored = len(rows) - len(unreadable) - len(rejected)
    print(
        f"{scored} image(s) scored, {len(rejected)} rejected by the quality gate, {len(unreadable)} unreadable",
        file=sys.stderr,
    )
    for row in rejected:
        print(f"  rejected: {row['path']} ({row['reason']})", file=sys.stderr)
    for row in unreadable:
        print(f"  unreadable: {row['path']} ({row['error']})", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import ExportError, export

    try:
        result = export(args.checkpoint, args.format, args.out, args.quantize, args.data)
    except ExportError as error:
        print(f"anemia-dist export: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


def cmd_audit_data(args: argparse.Namespace) -> int:
    from .audit import audit_data

    cfg = load_config(args.config, args.overrides)
    if args.compare:
        return _compare_sets(args.compare, cfg, args.out)
    _, _, report = audit_data(cfg.data)
    out = Path(args.out or Path(cfg.run.output_dir) / "audit")
    path = report.write(out)
    print(report.summary_text())
    print(f"report: {path} (every finding, with paths) and {out / AUDIT_JSON} (counts)")
    if report.bad and cfg.data.bad_files == "error":
        print(f"anemia-dist audit-data: {report.bad_files_message()}", file=sys.stderr)
        return 1
    return 0


def _compare_sets(specs: list[str], cfg: Config, out: str | None) -> int:
    """``audit-data --compare TRAIN TEST``: exit 1 when any test file has a copy in training."""
    from . import leakage

    rows, counts = leakage.compare(specs[0], specs[1], cfg.data)
    path = leakage.write(out or Path(cfg.run.output_dir) / "compare", rows, counts)
    print(leakage.text(rows, counts))
    print(f"report: {path} (every pair, with paths, labels and distances)")
    return 1 if rows else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench, table

    results = run_bench(args)
    print(table(results))
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(f"results written to {args.output}")
    return 0


def cmd_gpu_check(args: argparse.Namespace) -> int:
    from .gpu_check import collective_probe, run_gpu_check

    if args.collective_probe:
        return collective_probe(*args.collective_probe)
    parser, common = build_parser(), ["bench", "--arch", args.arch]
    runs = {
        "bench": parser.parse_args(common),
        "bench --compile": parser.parse_args(
            [*common, "--compile", "--small", "16", "--large", "0", "--e2e-steps", "10"]
        ),
    }
    return run_gpu_check(runs, launch_command, args.arch, args.workdir)


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import main as sweep_main

    return sweep_main(args)


def cmd_fetch_weights(args: argparse.Namespace) -> int:
    from .model import fetch_weights

    ModelConfig(arch=args.arch, weights="none")  # a misspelt arch fails as in training
    path = fetch_weights(args.arch)
    print(f"pretrained weights for {args.arch} are in {path}")
    return 0


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train with a config file plus key=value overrides")
    train.add_argument("--config", help="YAML file, or a packaged config name (default, demo)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=10 data.root=/data")
    train.set_defaults(func=cmd_train)


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="generate a synthetic dataset and train on it (no download, no GPU)")
    demo.add_argument("--output-dir", default="runs")
    demo.add_argument("--num-processes", type=int, default=None, help="default: 2 CPU ranks, or every GPU")
    demo.add_argument("overrides", nargs="*", help="dotted overrides passed to train")
    demo.set_defaults(func=cmd_demo)


def _add_audit_parser(sub: argparse._SubParsersAction) -> None:
    audit = sub.add_parser(
        "audit-data",
        help="check every image (bad files, duplicates, label conflicts) as training would; exit 1 if it would stop",
    )
    audit.add_argument("--config", help="YAML file, or a packaged config name (default, demo, cp_anemic)")
    audit.add_argument("--out", help="report folder (default: RUN.OUTPUT_DIR/audit, or RUN.OUTPUT_DIR/compare)")
    audit.add_argument(
        "--compare",
        nargs=2,
        metavar=("TRAIN", "TEST"),
        help="report every exact and near copy of a TEST image in TRAIN (folders, manifests, or a run's "
        "splits.csv twice: its train rows against its val rows); exit 1 when any is found",
    )
    audit.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.manifest=/data/sheet.csv")
    audit.set_defaults(func=cmd_audit_data)


def _add_fetch_parser(sub: argparse._SubParsersAction) -> None:
    fetch = sub.add_parser(
        "fetch-weights",
        help="download pretrained weights into the local cache (torch hub; Hugging Face hub for timm:<name>)",
    )
    fetch.add_argument("--arch", default=ModelConfig.arch, help=f"{', '.join(ARCHS)} or timm:<name>")
    fetch.set_defaults(func=cmd_fetch_weights)


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="input-pipeline and training throughput, PIL vs cached pipeline (JSON)")
    bench.add_argument("--data", help="folder of images to use (searched recursively); default: generated JPEGs")
    bench.add_argument("--output", default="bench.json", help="where to write the JSON results")
    bench.add_argument("--arch", default=ModelConfig.arch, help=f"{', '.join(ARCHS)} or timm:<name>")
    bench.add_argument(
        "--image-size", type=int, default=DataConfig.image_size, help="default: the backbone's pretrained input size"
    )
    bench.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    bench.add_argument(
        "--workers",
        type=int,
        default=None,
        help="loader workers for both pipelines; default 0 on CPU (one core each), 8 on a GPU",
    )
    bench.add_argument("--small", type=int, default=64, help="generated 640x480 JPEGs")
    bench.add_argument("--large", type=int, default=12, help="generated 3000x4000 JPEGs")
    bench.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per data measurement")
    bench.add_argument("--steps", type=int, default=20, help="timed steps per model measurement")
    bench.add_argument("--e2e-steps", type=int, default=20, help="timed end-to-end training steps per pipeline")
    bench.add_argument(
        "--precision",
        choices=["bf16", "fp16", "fp32"],
        default=None,
        help="default: bf16 autocast on a GPU that computes it natively, fp16 on older GPUs, fp32 on the CPU",
    )
    bench.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (model rates and end-to-end steps; every batch shape compiles before timing)",
    )
    bench.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    bench.set_defaults(func=cmd_bench)


def _add_gpu_check_parser(sub: argparse._SubParsersAction) -> None:
    check = sub.add_parser(
        "gpu-check",
        help="what only a GPU can show (bench targets, waits for the GPU, compiled graphs, score agreement, "
        "NCCL timeout): one PASS/FAIL line each, about 10 minutes",
    )
    check.add_argument("--arch", default=ModelConfig.arch, choices=ARCHS, help="the model of every check")
    check.add_argument("--workdir", default=None, help="where the synthetic data and runs go (default: a temp dir)")
    check.add_argument("--collective-probe", nargs=2, type=float, default=None, help=argparse.SUPPRESS)
    check.set_defaults(func=cmd_gpu_check)


def _add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    sweep = sub.add_parser("sweep", help="hyperparameter sweeps over config keys: W&B (init) or a local grid (run)")
    add_sweep_arguments(sweep)
    sweep.set_defaults(func=cmd_sweep)


def add_quality_gate_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-quality-gate",
        dest="quality_gate",
        action="store_false",
        help="score every readable file, even ones the quality gate would reject (too small, blank, ...)",
    )


def _add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser(
        "evaluate",
        help="metrics with 95%% intervals on labelled images at the model's saved threshold (1..N processes)",
    )
    evaluate.add_argument("--checkpoint", required=True, help="the run's best/ directory")
    evaluate.add_argument("--data", required=True, help="image folder (one sub-folder per class) or manifest CSV")
    evaluate.add_argument("--out", help="also write the metrics JSON to this file")
    evaluate.add_argument(
        "--report", help="report folder (default: OUT_report/ beside --out, else ./evaluation_report)"
    )
    evaluate.add_argument(
        "--split",
        choices=["train", "val"],
        help="only these rows of a manifest with a split column (a run's splits.csv)",
    )
    evaluate.add_argument("--batch-size", type=int, default=64, help="per process")
    add_quality_gate_flag(evaluate)
    evaluate.add_argument(
        "overrides",
        nargs="*",
        help="data.* keys saying how to read --data (e.g. data.group_column=patient), eval.bootstrap=N",
    )
    evaluate.set_defaults(func=cmd_evaluate)


def _add_predict_parser(sub: argparse._SubParsersAction) -> None:
    predict = sub.add_parser(
        "predict", help="probability and decision at the saved threshold for image files or folders"
    )
    predict.add_argument("--checkpoint", required=True, help="the run's best/ directory")
    predict.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    predict.add_argument("--out", help="CSV file (default: standard output)")
    predict.add_argument("--batch-size", type=int, default=64)
    predict.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    add_quality_gate_flag(predict)
    predict.add_argument(
        "--explain",
        metavar="DIR",
        help="also write a Grad-CAM overlay (PNG, the photo's own size) per scored photo into DIR",
    )
    predict.set_defaults(func=cmd_predict)


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export",
        help="one portable file (ONNX or TorchScript) with the resize, normalisation, model and temperature: "
        "uint8 RGB images in, P(positive class) out",
    )
    export.add_argument("--checkpoint", required=True, help="the run's best/ directory")
    export.add_argument("--format", required=True, help="onnx (any ONNX runtime) or torchscript (torch.jit.load)")
    export.add_argument("--out", required=True, help="the file to write (e.g. model.onnx, model.pt)")
    export.add_argument(
        "--quantize",
        action="store_true",
        help="ONNX only: also write OUT.int8.onnx (dynamic int8) and OUT.int8.json (its AUROC and decisions "
        "against the fp32 file on labelled images)",
    )
    export.add_argument(
        "--data",
        help="labelled images for --quantize's parity (class folders or a path,label CSV); default: the run's "
        "validation split (splits.csv beside --checkpoint)",
    )
    export.set_defaults(func=cmd_export)


def _add_study_parsers(sub: argparse._SubParsersAction) -> None:
    study = sub.add_parser(
        "study",
        help="cross-validation (study.folds=K) or leave-one-site-out (study.by=site): one run per fold in "
        "RUN/fold-K, tested on its held-out fold, pooled into RUN/study.json (reruns continue)",
    )
    study.add_argument("--config", help="YAML file, or a packaged config name (default, demo, cp_anemic)")
    study.add_argument("overrides", nargs="*", help="dotted overrides, e.g. study.folds=5 run.name=cv5")
    study.set_defaults(func=cmd_study)
    report = sub.add_parser("study-report", help="pool whatever folds of a study are done (study.json, report)")
    report.add_argument("study_dir", help="the study's directory, RUN.OUTPUT_DIR/RUN.NAME")
    report.add_argument("overrides", nargs="*", help="e.g. eval.prevalence=0.2 study.subgroups=[GENDER]")
    report.set_defaults(func=cmd_study_report)


SUBCOMMANDS = (
    _add_train_parser,
    _add_study_parsers,
    _add_demo_parser,
    _add_audit_parser,
    _add_fetch_parser,
    _add_bench_parser,
    _add_gpu_check_parser,
    _add_sweep_parser,
    _add_evaluate_parser,
    _add_predict_parser,
    _add_export_parser,
)
"""One function per sub-command adds its parser, in the order ``--help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anemia-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add_parser in SUBCOMMANDS:
        add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        return args.func(args)
    except USER_ERRORS as error:
        if _is_main_rank():
            print(f"anemia-dist {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
