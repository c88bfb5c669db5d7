"""The audit at the start of real 2-rank training runs: bad files stop or are skipped, never silently."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import BAD, TINY, add_bad_files, check, launch, make_image_folder

from anemia_dist.run_dir import AUDIT_JSON, EXCLUDED, SPLITS, SUMMARY

pytestmark = pytest.mark.multiprocess


def train_args(*overrides: str, config: str = "default") -> list[str]:
    return ["-m", "anemia_dist", "train", "--config", config, *TINY, *overrides]


def test_bad_files_stop_both_ranks_before_training_with_the_full_list(tmp_path):
    root = make_image_folder(tmp_path / "data", {"anemic": 8, "non-anemic": 8})
    add_bad_files(root)
    result = launch(train_args(f"data.root={root}", f"run.output_dir={tmp_path / 'runs'}", "run.name=r"), timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("5 bad file(s) found before training") == 1, "reported once, by the main process"
    assert all(name in result.stderr for name in BAD) and "data.bad_files=skip" in result.stderr
    assert not (tmp_path / "runs" / "r").exists(), "stopped before the run directory was made"


def test_skipped_files_are_listed_in_the_run_directory_and_counted_in_the_log(tmp_path):
    root = make_image_folder(tmp_path / "data", {"anemic": 8, "non-anemic": 8})
    add_bad_files(root)
    runs = tmp_path / "runs"
    result = check(
        launch(
            train_args(
                f"data.root={root}", "data.bad_files=skip", f"run.output_dir={runs}", "run.name=r", "train.epochs=1"
            )
        )
    )
    assert "left out 5 file(s)" in result.stdout and str(runs / "r" / EXCLUDED) in result.stdout
    with (runs / "r" / EXCLUDED).open() as handle:
        excluded = {Path(row["path"]).name: row["reason"] for row in csv.DictReader(handle)}
    assert excluded == BAD
    with (runs / "r" / SPLITS).open() as handle:
        assert not {Path(row["path"]).name for row in csv.DictReader(handle)} & set(BAD)
    assert json.loads((runs / "r" / AUDIT_JSON).read_text())["bad_files"] == 5


def test_cp_anemic_config_trains_on_the_real_data_with_no_preprocessing(tmp_path, cp_anemic):
    runs = tmp_path / "runs"
    sheet = cp_anemic / "Anemia_Data_Collection_Sheet.csv"
    result = check(
        launch(
            train_args(
                f"data.manifest={sheet}",
                f"run.output_dir={runs}",
                "run.name=cp",
                "train.epochs=1",
                "train.batch_size=32",
                config="cp_anemic",
            )
        )
    )
    assert "exact duplicates: 82 groups, 253 files" in result.stdout
    with (runs / "cp" / SPLITS).open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 615 and {r["label"] for r in rows} == {"Anemic", "Non-anemic"}
    summary = json.loads((runs / "cp" / SUMMARY).read_text())
    assert summary["epochs_run"] == 1 and summary["world_size"] == 2
