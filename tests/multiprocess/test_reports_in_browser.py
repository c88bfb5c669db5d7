"""The HTML reports as a reader sees them: opened in headless Chromium (skipped where it is not
installed), they load with no network request, every figure renders with a non-zero size, and a
full-page screenshot is kept (its path is printed; it stays in pytest's temporary folder).
The run's validation report is checked in ``test_report_run.py``."""

from __future__ import annotations

import pytest
from browser import check_report_renders, open_report
from helpers import make_best, make_manifest

from anemia_dist.inference import evaluate
from anemia_dist.report import FIGURES
from anemia_dist.run_dir import BEST, REPORT_PAGE

pytestmark = pytest.mark.multiprocess


def test_evaluation_report_renders_offline_with_every_figure(tmp_path):
    best = make_best(tmp_path / BEST, ["anemic", "non-anemic"], threshold=0.0)  # every negative is an error
    manifest = make_manifest(tmp_path / "data", {"anemic": 6, "non-anemic": 6})
    report = tmp_path / "report"
    evaluate(best, manifest, ["data.num_workers=0", "eval.bootstrap=100"], report_dir=report)
    # the four evaluation figures (no training curves here) and six false positives
    check = check_report_renders(
        report / REPORT_PAGE, tmp_path / "screenshots" / "evaluation.png", len(FIGURES) - 1 + 6
    )
    assert sum(1 for figure in check.figures if "P(anemic)" in figure["alt"]) == 6


def test_the_browser_check_sees_a_request_a_page_makes(tmp_path):
    """Negative control: a page that loads a picture from a server is caught."""
    page = tmp_path / "external.html"
    page.write_text('<!DOCTYPE html><html><body><img src="http://127.0.0.1:9/figure.png" alt="x"></body></html>')
    check = open_report(page, tmp_path / "external.png")
    assert "http://127.0.0.1:9/figure.png" in check.requests
    with pytest.raises(AssertionError, match="fetched"):
        check_report_renders(page, tmp_path / "external-again.png", 1)
