"""``anemia-dist predict`` and ``anemia-dist evaluate`` on a saved (random-init) model, in process.
(Two processes: ``tests/multiprocess/test_evaluate_processes.py``.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_best, make_image_folder, make_manifest, read_csv

from anemia_dist.cli import main
from anemia_dist.errors import ConfigError
from anemia_dist.inference import evaluate, predict
from anemia_dist.metrics import METRICS
from anemia_dist.run_dir import BEST, META, PREDICTIONS, REPORT_PAGE


def test_predict_lists_a_corrupt_file_and_scores_the_rest(tmp_path, capsys):
    best = make_best(tmp_path / BEST, ["anemic", "non-anemic"], threshold=0.5)
    folder = make_image_folder(tmp_path / "images", {"a": 5, "b": 4})
    (folder / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "notes.txt").write_text("not an image: listed with its error")
    out = tmp_path / "preds.csv"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(best),
                str(folder),
                "--out",
                str(out),
                "--batch-size",
                "4",
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    rows = read_csv(out)
    assert len(rows) == 11
    for name in ("broken.png", "notes.txt"):
        broken = [r for r in rows if r["path"].endswith(name)]
        assert len(broken) == 1 and broken[0]["error"] and broken[0]["probability"] == ""
    scored = [r for r in rows if not r["error"]]
    assert len(scored) == 9
    for row in scored:
        probability = float(row["probability"])
        assert 0.0 <= probability <= 1.0
        assert row["prediction"] == ("anemic" if probability >= 0.5 else "non-anemic")
    assert "broken.png" in capsys.readouterr().err


def test_predict_and_evaluate_see_the_same_images(tmp_path):
    """Same preprocessing (RGBA compositing, resize, normalisation), same temperature, same threshold."""
    best = make_best(tmp_path / BEST, ["anemic", "non-anemic"], threshold=0.47, temperature=2.0)
    manifest = make_manifest(tmp_path / "data", {"anemic": 6, "non-anemic": 5})
    record = evaluate(
        best, manifest, ["data.num_workers=0", "eval.bootstrap=100"], batch_size=4, report_dir=tmp_path / "rep"
    )
    evaluated = {r["path"]: r for r in read_csv(tmp_path / "rep" / PREDICTIONS)}
    listed = predict(best, [tmp_path / "data"], batch_size=3, num_workers=0)
    predicted = [r for r in listed if not r["path"].endswith("manifest.csv")]  # listed with its error
    assert len(listed) == len(predicted) + 1
    assert len(predicted) == len(evaluated) == record["n"] == 11
    for row in predicted:
        match = evaluated[row["path"]]
        assert float(row["probability"]) == pytest.approx(float(match["probability"]), abs=1e-6)
        assert row["prediction"] == match["prediction"]
    assert record["temperature"] == 2.0 and record["threshold"] == 0.47


def test_evaluate_record_has_every_metric_with_an_interval(tmp_path):
    best = make_best(tmp_path / BEST, ["anemic", "non-anemic"])
    manifest = make_manifest(tmp_path / "data", {"anemic": 8, "non-anemic": 8}, per_group=2)
    out = tmp_path / "eval" / "test.json"
    assert (
        main(
            [
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
                "eval.bootstrap=200",
            ]
        )
        == 0
    )
    record = json.loads(out.read_text())
    for name in METRICS:
        assert name in record and set(record["ci"][name]) == {"low", "high", "method"}
    assert record["n"] == 16 and record["n_patients"] == 8 and record["positive_class"] == "anemic"
    assert record["ci"]["sensitivity"]["method"] == "bootstrap over patients"
    cm = record["confusion_matrix"]
    assert sum(cm.values()) == 16 and cm["true_positive"] + cm["false_negative"] == 8
    assert Path(record["report"]) == tmp_path / "eval" / "test_report" / REPORT_PAGE


def test_evaluate_refuses_to_retune_the_operating_point(tmp_path, capsys):
    best = make_best(tmp_path / BEST, ["anemic", "non-anemic"])
    folder = make_image_folder(tmp_path / "data", {"anemic": 2, "non-anemic": 2})
    with pytest.raises(ConfigError, match="eval.threshold_rule: evaluate takes only data"):
        evaluate(best, folder, ["eval.threshold_rule=youden"])
    assert main(["evaluate", "--checkpoint", str(best), "--data", str(folder), "data.image_size=64"]) == 2
    assert "data.image_size: evaluate takes only data" in capsys.readouterr().err


def test_evaluate_without_a_saved_threshold_is_a_clear_error(tmp_path):
    best = make_best(tmp_path / BEST, ["anemic", "non-anemic"])
    meta = json.loads((best / META).read_text())
    del meta["threshold"]
    (best / META).write_text(json.dumps(meta))
    folder = make_image_folder(tmp_path / "data", {"anemic": 2, "non-anemic": 2})
    with pytest.raises(ConfigError, match="meta.json has no threshold"):
        evaluate(best, folder)


def test_evaluate_on_cp_anemic(tmp_path, cp_anemic):
    best = make_best(tmp_path / BEST, ["Anemic", "Non-anemic"])
    record = evaluate(
        best,
        cp_anemic,
        ["data.num_workers=2", "eval.bootstrap=200"],
        batch_size=64,
        out=tmp_path / "cp.json",
        report_dir=tmp_path / "report",
    )
    anemic = len(list((cp_anemic / "Anemic").glob("*.png")))
    total = anemic + len(list((cp_anemic / "Non-anemic").glob("*.png")))
    assert record["n"] == total == 615 and record["n_positive"] == anemic
    assert record["positive_class"] == "Anemic" and record["negative_class"] == "Non-anemic"
    assert (
        record["auroc"] is not None and record["ci"]["auroc"]["low"] <= record["auroc"] <= record["ci"]["auroc"]["high"]
    )
    assert (tmp_path / "report" / REPORT_PAGE).is_file()


def test_evaluate_reads_the_decoded_images_a_training_run_stored_in_cache_dir(tmp_path, monkeypatch):
    from anemia_dist import datasets

    best = make_best(tmp_path / BEST, ["anemic", "non-anemic"])
    folder = make_image_folder(tmp_path / "images", {"anemic": 5, "non-anemic": 4})
    store = tmp_path / "cache"
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    datasets.decode_all(paths, 32, [124, 116, 104], cache_dir=store)  # what training stores for validation
    report = dict(report_dir=tmp_path / "report")
    expected = evaluate(best, folder, ["data.num_workers=0"], **report)

    def no_decoding(*args):
        raise AssertionError("decoded although the cache holds the image")

    monkeypatch.setattr(datasets, "decode", no_decoding)
    stored = evaluate(best, folder, ["data.num_workers=0", f"data.cache_dir={store}"], **report)
    assert stored["n"] == 9 and stored["auroc"] == expected["auroc"] and stored["loss"] == expected["loss"]
    with pytest.raises(AssertionError, match="decoded although"):  # without it, every file is decoded
        evaluate(best, folder, ["data.num_workers=0"], **report)
