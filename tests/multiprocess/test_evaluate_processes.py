"""``anemia-dist evaluate`` on 1 and 2 processes: the same numbers."""

from __future__ import annotations

import json

import pytest
from helpers import assert_same_numbers, check, launch, make_best, make_manifest, read_csv

from anemia_dist.run_dir import BEST, PREDICTIONS

pytestmark = pytest.mark.multiprocess


def test_evaluate_on_two_processes_gives_the_one_process_numbers(tmp_path):
    """13 + 10 images in batches of 4 on 2 ranks: the sampler pads the last batch; patients have 2 images."""
    best = make_best(tmp_path / BEST, ["anemic", "non-anemic"])
    manifest = make_manifest(tmp_path / "data", {"anemic": 13, "non-anemic": 10}, per_group=2)
    records = {}
    for processes in (1, 2):
        out = tmp_path / f"eval{processes}.json"
        args = [
            "-m",
            "anemia_dist",
            "evaluate",
            "--checkpoint",
            str(best),
            "--data",
            str(manifest),
            "--out",
            str(out),
            "--batch-size",
            "4",
            "data.num_workers=0",
            "eval.bootstrap=300",
        ]
        assert f"{processes} process(es)" in check(launch(args, num_processes=processes)).stdout
        records[processes] = json.loads(out.read_text())
        records[processes].pop("report")
    assert records[1]["n"] == records[2]["n"] == 23
    assert_same_numbers(records[1], records[2])
    one, two = (read_csv(tmp_path / f"eval{p}_report" / PREDICTIONS) for p in (1, 2))
    assert [(row["path"], row["prediction"]) for row in one] == [(row["path"], row["prediction"]) for row in two]
    assert_same_numbers([float(row["probability"]) for row in one], [float(row["probability"]) for row in two])
