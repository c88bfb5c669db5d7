"""The preemption watcher on 4 ranks: a signal to one rank stops every rank at the same step."""

from __future__ import annotations

import json
import re

import pytest
from helpers import ROOT, check, launch


@pytest.mark.multiprocess
def test_a_signal_to_one_of_four_ranks_stops_all_of_them_after_the_next_step():
    """The flags of step 7 are all-reduced without waiting and read after step 8, by every rank."""
    probe = [str(ROOT / "tests" / "scripts" / "watcher_probe.py"), "30", "--signal", "2:7", "--work-ms", "1"]
    result = check(launch(probe, num_processes=4, timeout=300))
    rows = [json.loads(row) for row in re.findall(r"\{[^{}]*\}", result.stdout)]
    assert sorted(row["rank"] for row in rows) == [0, 1, 2, 3]
    assert [row["stopped_after"] for row in rows] == [8] * 4
