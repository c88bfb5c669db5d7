"""The report files: every figure as PNG, and one self-contained page showing them with the metrics.
(What training leaves behind for it: ``tests/multiprocess/test_report_run.py``.)"""

from __future__ import annotations

import re

import numpy as np

from anemia_dist.metrics import OperatingPoint, summarize
from anemia_dist.report import FIGURES, write_report
from anemia_dist.run_dir import CURVES, REPORT_PAGE

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_rows(epochs: int = 6) -> list[dict]:
    return [
        {
            "epoch": e,
            "train_loss": 1 / e,
            "val_loss": 1.1 / e,
            "train_acc": 0.5 + e / 20,
            "val_acc": 0.5 + e / 25,
            "val_auroc": 0.6 + e / 30,
            "val_sensitivity": 0.9,
            "val_specificity": 0.4 + e / 20,
            "lr": [1e-4 if e < 5 else 5e-5, 1e-4],
            "lr_groups": ["head", "layer4"],
            "unfrozen": [] if e < 3 else ["layer4"],
        }
        for e in range(1, epochs + 1)
    ]


def test_report_files_exist_and_the_page_shows_and_links_them(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 120)
    p0 = 1 / (1 + np.exp(-(rng.normal(0, 1, 120) + (labels == 0))))
    probs = np.stack([p0, 1 - p0], axis=1)
    point = OperatingPoint("Anemic", 0.55, "youden", temperature=1.5)
    evaluation = summarize(labels, probs, ["Anemic", "Non-anemic"], point, 200, [f"p{i // 2}" for i in range(120)])
    page = write_report(tmp_path / "report", "Test report", evaluation, ["a caller's note"], fake_rows())

    assert page == tmp_path / "report" / REPORT_PAGE
    text = page.read_text()
    for name in FIGURES:
        assert (tmp_path / "report" / name).read_bytes().startswith(PNG_SIGNATURE), name
        assert f'href="{name}"' in text
    assert text.count("data:image/png;base64,") == len(FIGURES)  # readable without the PNG files
    assert not re.search(r'(src|href)="https?:', text)  # nothing fetched from elsewhere
    assert f"{evaluation.result['auroc']:.3f}" in text and "bootstrap over patients" in text
    assert "ECE before temperature scaling" in text and "a caller&#x27;s note" in text


def test_report_without_training_rows_has_no_curves(tmp_path):
    labels = np.array([0, 0, 1, 1, 0, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.55, 0.45], [0.2, 0.8], [0.1, 0.9]])
    evaluation = summarize(labels, probs, ["anemic", "non-anemic"], OperatingPoint("anemic", 0.5, "fixed"), 100)
    text = write_report(tmp_path, "No curves", evaluation).read_text()
    assert not (tmp_path / CURVES).exists() and "curves.png" not in text
    assert "no patient column" in text and "too narrow" in text
