"""The command line: a user's mistake is one message and exit status 2, before any work starts."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
from helpers import ROOT, TINY, make_manifest, write_csv

from anemia_dist.cli import main
from anemia_dist.config import EvalConfig
from anemia_dist.errors import DataError
from anemia_dist.metrics import require_both_classes


def test_config_errors_stop_before_any_work(tmp_path, image_folder, capsys):
    assert main(["train", f"data.root={image_folder}", f"run.output_dir={tmp_path}", "train.epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "train.epoch: unknown key (did you mean train.epochs?)" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == [image_folder]


def test_no_data_source_is_an_error_saying_what_to_set(tmp_path, capsys):
    assert main(["train", f"run.output_dir={tmp_path}"]) == 2
    assert "data.root=FOLDER" in capsys.readouterr().err


def test_a_fixed_validation_split_with_one_class_stops_before_training_with_the_way_out(tmp_path, capsys):
    manifest = make_manifest(tmp_path / "data", {"anemic": 6, "non-anemic": 6}, per_group=1)
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    # Every validation image is non-anemic: the youden threshold cannot be chosen on it.
    fixed = [
        {**row, "split": "val" if row["label"] == "non-anemic" and i % 2 else "train"} for i, row in enumerate(rows)
    ]
    write_csv(manifest, fixed)
    runs = tmp_path / "runs"
    assert main(["train", *TINY, f"data.manifest={manifest}", f"run.output_dir={runs}", "run.name=r"]) == 2
    err = capsys.readouterr().err
    assert "eval.threshold_rule=youden needs validation images of both" in err
    assert "found 0 positive of 3" in err and "eval.threshold_rule=fixed" in err
    assert "Traceback" not in err and not (runs / "r").exists(), "stopped before the run directory was made"


def test_both_classes_are_needed_only_by_a_rule_fitted_on_validation():
    one_class = [False, False, False]
    with pytest.raises(DataError, match="needs validation images of both"):
        require_both_classes(one_class, EvalConfig(threshold_rule="sensitivity"))
    require_both_classes(one_class, EvalConfig(threshold_rule="fixed"))  # nothing to fit: no error
    require_both_classes([True, False], EvalConfig())


def test_the_command_line_starts_without_importing_torch():
    """``anemia-dist --help``, ``sweep`` and the parent of every launch start in a fraction of a
    second: the parser and the sweep module import no torch (a sub-command's module loads when it
    runs). Torch is blocked in the probe, so importing it anywhere fails there at once."""
    probe = (
        "import sys; sys.modules['torch'] = None\n"
        "from anemia_dist.cli import build_parser\nimport anemia_dist.sweep\n"
        "print(build_parser().parse_args(['sweep', 'run', 'sweep.yaml']).command)\n"
        "try:\n    import anemia_dist.preemption\nexcept ImportError:\n    print('blocked')\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["sweep", "blocked"]  # a module that imports torch fails in the probe
