"""Trackers in real runs: the W&B offline fallback of a one-process run, and what a real 2-rank
run writes to W&B (read back from its ``.wandb`` file with wandb's own protobuf records), MLflow
(``mlflow.get_run`` on the default store, and on a real ``mlflow server``) and TensorBoard
(tensorboard's ``EventAccumulator``); a tracker that cannot start stops every rank."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import yaml
from helpers import ROOT, TINY, check, free_port, launch, make_image_folder, run_cli, tensorboard_scalars
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from wandb_records import config, history, read_records, run_id, summary

from anemia_dist import tracking
from anemia_dist.run_dir import (
    CHECKPOINT_INFO,
    CHECKPOINTS,
    CONFIG,
    MLFLOW_STORE,
    SUMMARY,
    TENSORBOARD_EVENTS,
    read_metrics,
)

pytestmark = pytest.mark.multiprocess

FALLBACK = "W&B online logging unavailable"


@pytest.fixture
def listening_server():
    """A TCP port that accepts connections (the kernel completes them) and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def test_online_without_an_api_key_trains_on_and_logs_offline_with_a_message(tmp_path, listening_server):
    data = make_image_folder(tmp_path / "data", {"anemic": 8, "non-anemic": 8})
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    # No key anywhere: a fresh HOME has no ~/.netrc or W&B settings.
    env |= {
        "HOME": str(tmp_path / "home"),
        "WANDB_BASE_URL": listening_server,
        "WANDB_DIR": str(tmp_path),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "anemia_dist",
            "train",
            *TINY,
            f"data.root={data}",
            "train.epochs=1",
            f"run.output_dir={tmp_path / 'runs'}",
            "run.name=r",
            "tracking.wandb=online",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    check(result)
    assert FALLBACK in result.stderr and "No API key" in result.stderr and "wandb sync" in result.stderr
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    logged = history(read_records(next(offline.glob("run-*.wandb"))))
    assert [row["epoch"] for row in logged] == [1]


def wandb_runs(directory: Path) -> list[Path]:
    return sorted((directory / "wandb").glob("*run-*"), key=lambda p: p.name)


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """A real 2-rank run logging to all three trackers, then resumed for one more epoch. W&B runs
    with WANDB_MODE=offline (as on a compute node) although the config says online; MLflow logs to
    its default store in run.output_dir."""
    root = tmp_path_factory.mktemp("tracking")
    data = make_image_folder(root / "data", {"anemic": 12, "non-anemic": 12})
    args = [
        "-m",
        "anemia_dist",
        "train",
        *TINY,
        f"data.root={data}",
        "unfreeze.head_only_epochs=1",
        "early_stopping.patience=50",
        f"run.output_dir={root / 'runs'}",
        "run.name=tracked",
        "tracking.wandb=online",
        "tracking.log_with=[mlflow, tensorboard]",
        "tracking.tags=[ci]",
    ]
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(root), "MLFLOW_TRACKING_URI": ""}
    run_dir = root / "runs" / "tracked"
    first = check(launch([*args, "train.epochs=3"], env=env))
    first_runs, first_summary = wandb_runs(root), json.loads((run_dir / SUMMARY).read_text())
    first_config = yaml.safe_load((run_dir / CONFIG).read_text())
    first_mlflow_id = last_progress(run_dir)["mlflow_run_id"]
    check(launch([*args, "train.epochs=4", "run.resume=auto"], env=env))
    return SimpleNamespace(
        root=root,
        run_dir=run_dir,
        first=first,
        first_runs=first_runs,
        first_summary=first_summary,
        first_config=first_config,
        first_mlflow_id=first_mlflow_id,
    )


def last_progress(run_dir: Path) -> dict:
    newest = sorted((run_dir / CHECKPOINTS).glob("epoch-*"))[-1]
    return json.loads((newest / CHECKPOINT_INFO).read_text())["progress"]


def values_equal(logged, expected) -> bool:
    if isinstance(logged, float) and math.isnan(logged):
        return math.isnan(expected)
    return logged == pytest.approx(expected, rel=1e-12)


def test_two_rank_offline_run_logs_exactly_what_metrics_jsonl_holds(offline_run):
    assert FALLBACK not in offline_run.first.stderr  # WANDB_MODE=offline: no attempt to go online
    runs = offline_run.first_runs
    assert len(runs) == 1 and runs[0].name.startswith("offline-run-"), runs
    records = read_records(next(runs[0].glob("run-*.wandb")))
    run_dir = offline_run.run_dir
    metrics = read_metrics(run_dir)[:3]

    logged = {row["_step"]: row for row in history(records)}
    assert sorted(logged) == [1, 2, 3]
    for row in metrics:
        entry = logged[row["epoch"]]
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert numbers, row
        for key, value in numbers.items():
            assert values_equal(entry[key], value), (row["epoch"], key, entry.get(key), value)
        for name, lr in zip(row["lr_groups"], row["lr"], strict=True):
            assert entry[f"lr/{name}"] == pytest.approx(lr, rel=1e-12)
    assert [logged[e]["trainable_stages"] for e in (1, 2, 3)] == [0, 1, 1]  # unfrozen at epoch 2

    logged_config = config(records)
    for section, values in offline_run.first_config.items():
        assert logged_config[section] == values, section

    outcome = summary(records)
    assert outcome["best_epoch"] == offline_run.first_summary["best_epoch"]
    assert outcome["best_val_loss"] == pytest.approx(offline_run.first_summary["best_val_loss"], rel=1e-12)
    assert outcome["stop_reason"] == "max_epochs" and outcome["unfreeze_epoch"] == 2


def test_resumed_run_continues_the_same_wandb_run_from_the_next_epoch(offline_run):
    root, first_runs = offline_run.root, offline_run.first_runs
    runs = wandb_runs(root)
    assert len(runs) == 2 and first_runs[0] in runs
    (second,) = [r for r in runs if r not in first_runs]
    first_records = read_records(next(first_runs[0].glob("run-*.wandb")))
    second_records = read_records(next(second.glob("run-*.wandb")))
    assert run_id(second_records) == run_id(first_records)
    saved = last_progress(root / "runs" / "tracked")["tracker_run_id"]
    assert saved == run_id(first_records)
    assert [row["_step"] for row in history(second_records)] == [4]
    assert [row["epoch"] for row in read_metrics(root / "runs" / "tracked")] == [1, 2, 3, 4]


def mlflow_runs(uri: str) -> list:
    return mlflow.MlflowClient(tracking_uri=uri).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(tracking_uri=uri).search_experiments()]
    )


def assert_mlflow_run_holds(client: mlflow.MlflowClient, run_id: str, config: dict, rows: list[dict]) -> None:
    """Params: the flat config; metrics: every row's numbers and lr per group, each epoch once."""
    logged = client.get_run(run_id)
    assert logged.data.params == {k: str(v) for k, v in tracking.flat_config(config).items()}
    for key in ("val_loss", "train_loss", "val_auroc", "lr/head", "trainable_stages"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        expected = [(row["epoch"], tracking.logged_values(row)[key]) for row in rows]
        assert [step for step, _ in history] == [step for step, _ in expected], key
        assert all(values_equal(v, e) for (_, v), (_, e) in zip(history, expected, strict=True)), key


def test_two_rank_run_logs_one_mlflow_run_and_the_resume_continues_it(offline_run):
    uri = f"sqlite:///{offline_run.root / 'runs' / MLFLOW_STORE}"  # the default store
    (run,) = mlflow_runs(uri)  # two ranks, two starts: one run
    assert run.info.run_id == offline_run.first_mlflow_id == last_progress(offline_run.run_dir)["mlflow_run_id"]
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED" and run.data.tags["ci"] == "true"
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.get_experiment(run.info.experiment_id).name == "anemia-dist"
    rows = read_metrics(offline_run.run_dir)
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    # MLflow params are write-once: the first start's config stays (the resume changed train.epochs).
    assert_mlflow_run_holds(client, run.info.run_id, offline_run.first_config, rows)
    final = json.loads((offline_run.run_dir / SUMMARY).read_text())
    assert run.data.metrics["best_val_loss"] == pytest.approx(final["best_val_loss"], rel=1e-12)
    assert run.data.metrics["unfreeze_epoch"] == 2 and run.data.tags["stop_reason"] == "max_epochs"


def hparams(folder: Path) -> list[dict]:
    """The hparams TensorBoard records (one per start), read with its own reader and protobufs."""
    found = []
    for sub in sorted(p for p in folder.iterdir() if any(p.glob("events.out.tfevents.*"))):
        events = EventAccumulator(str(sub))
        events.Reload()
        for content in events.PluginTagToContent("hparams").values():
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            if data.HasField("session_start_info"):
                found.append({k: getattr(v, v.WhichOneof("kind")) for k, v in data.session_start_info.hparams.items()})
    return found


def test_two_rank_run_writes_tensorboard_events_once_per_start(offline_run):
    folder = offline_run.run_dir / TENSORBOARD_EVENTS
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2  # the main process, at each of two starts
    rows = read_metrics(offline_run.run_dir)
    for key in ("val_loss", "train_acc", "lr/head", "lr/layer4"):
        logged = tensorboard_scalars(folder, key)
        assert logged == [(r["epoch"], pytest.approx(tracking.logged_values(r)[key], rel=1e-6)) for r in rows], key
    final = json.loads((offline_run.run_dir / SUMMARY).read_text())
    assert tensorboard_scalars(folder, "summary/best_val_loss") == [
        (3, pytest.approx(offline_run.first_summary["best_val_loss"], rel=1e-6)),
        (4, pytest.approx(final["best_val_loss"], rel=1e-6)),
    ]
    first_start = hparams(folder)[0]
    expected = tracking.flat_config(offline_run.first_config)
    assert first_start == {k: pytest.approx(v) if isinstance(v, float) else v for k, v in expected.items()}


def test_a_tracker_that_cannot_start_stops_every_rank_with_the_reason(tmp_path):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        address = f"http://127.0.0.1:{closed.getsockname()[1]}"
    data = make_image_folder(tmp_path / "data", {"anemic": 12, "non-anemic": 12})
    args = ["-m", "anemia_dist", "train", *TINY, f"data.root={data}", f"run.output_dir={tmp_path / 'runs'}"]
    args += ["run.name=r", "tracking.log_with=[mlflow]", f"tracking.mlflow_uri={address}"]
    result = launch(args, timeout=180)  # a rank left waiting for the main process would hang here
    assert result.returncode != 0
    assert f"tracking.mlflow_uri: MLflow server cannot reach {address}" in result.stderr
    assert read_metrics(tmp_path / "runs" / "r") == [] and not (tmp_path / "runs" / "r" / CHECKPOINTS).exists()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on 127.0.0.1 (a free port), stopped with all its processes at the end."""
    port = free_port()
    command = ["server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}"]
    command += ["--artifacts-destination", str(tmp_path / "artifacts")]
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [str(mlflow_bin), *command], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while tracking.unreachable(url) is not None:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "mlflow server did not start in 120 s"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_a_run_logs_to_a_real_mlflow_server(tmp_path, mlflow_server):
    data = make_image_folder(tmp_path / "data", {"anemic": 12, "non-anemic": 12})
    args = [*TINY, f"data.root={data}", "train.epochs=2", "unfreeze.head_only_epochs=1"]
    args += [f"run.output_dir={tmp_path / 'runs'}", "run.name=served", "tracking.log_with=[mlflow]"]
    args += [f"tracking.mlflow_uri={mlflow_server}", "tracking.project=screening"]
    check(run_cli("train", *args, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}))
    run_dir = tmp_path / "runs" / "served"
    (run,) = mlflow_runs(mlflow_server)
    assert run.info.run_id == last_progress(run_dir)["mlflow_run_id"] and run.info.run_name == "served"
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    assert client.get_experiment(run.info.experiment_id).name == "screening"
    config = yaml.safe_load((run_dir / CONFIG).read_text())
    assert_mlflow_run_holds(client, run.info.run_id, config, read_metrics(run_dir))
    assert not (tmp_path / "runs" / MLFLOW_STORE).exists()  # nothing went to the default store
