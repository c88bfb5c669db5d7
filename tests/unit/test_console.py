"""Log lines as a person (or ``grep '^epoch'`` on a SLURM log) reads them: the message as written,
information on standard output, warnings on standard error."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from accelerate import PartialState
from accelerate.logging import get_logger

from anemia_dist.console import _MessageFormatter, configure_logging, progress_bar


def test_main_process_lines_read_as_written_and_warnings_go_to_stderr(capsys):
    PartialState()  # accelerate's logger needs the process state
    configure_logging()
    configure_logging()  # a second call adds no second handler
    logger = get_logger("anemia_dist.some_module")
    logger.info("epoch   1  train loss 0.5000")
    logger.warning("anemia-dist: W&B online logging unavailable")
    out, err = capsys.readouterr()
    assert out == "epoch   1  train loss 0.5000\n"
    assert err == "anemia-dist: W&B online logging unavailable\n"


def test_only_the_main_process_prefix_is_dropped():
    def formatted(message: str) -> str:
        record = logging.LogRecord("anemia_dist", logging.INFO, __file__, 1, message, None, None)
        return _MessageFormatter("%(message)s").format(record)

    assert formatted("[RANK 0] epoch 1") == "epoch 1"
    assert formatted("[RANK 1] epoch 1") == "[RANK 1] epoch 1", "another rank's line keeps its rank"


def test_progress_bars_show_on_the_global_main_process_only():
    """Node 2's local rank 0 stays quiet: one bar in a multi-node SLURM log, not one per node."""
    node2 = SimpleNamespace(is_main_process=False, is_local_main_process=True)
    main = SimpleNamespace(is_main_process=True, is_local_main_process=True)
    assert progress_bar(node2, range(3), "epoch 1 train").disable
    assert not progress_bar(main, range(3), "epoch 1 train").disable
