"""What a person watching a run sees: the package's log lines and its progress bars.

Modules log through ``accelerate.logging.get_logger(__name__)``: a line is written by the main
process only, unless the call passes ``main_process_only=False``. The CLI calls
:func:`configure_logging` once; a program that imports the package sets up logging its own way.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

if TYPE_CHECKING:  # importing accelerate imports torch: seconds that `anemia-dist --help` need not wait
    from accelerate import Accelerator

PACKAGE = "anemia_dist"
MAIN_PROCESS_PREFIX = "[RANK 0] "
"""What accelerate's logger puts before every message of the main process."""


class _ConsoleHandler(logging.StreamHandler):
    """Information to standard output, warnings and errors to standard error, each looked up when
    a line is written (so redirected or captured streams are honoured), flushed line by line (so a
    SLURM log shows it at once)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        super().emit(record)


class _MessageFormatter(logging.Formatter):
    """The message alone. accelerate's logger prefixes each message with ``[RANK n]``; the main
    process's lines (every line, unless a call passes ``main_process_only=False``) go out as
    written, so ``grep '^epoch'`` on a log keeps working; the other ranks keep their prefix."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).removeprefix(MAIN_PROCESS_PREFIX)


def configure_logging(level: int = logging.INFO) -> None:
    """Plain lines (the message only) from every ``anemia_dist`` logger; calling it again changes nothing."""
    logger = logging.getLogger(PACKAGE)
    logger.setLevel(level)
    if not any(isinstance(handler, _ConsoleHandler) for handler in logger.handlers):
        handler = _ConsoleHandler()
        handler.setFormatter(_MessageFormatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def progress_bar(accelerator: Accelerator, iterable: Iterable, desc: str, **kwargs) -> tqdm:
    """tqdm on the global main process only (N nodes share one SLURM log: one bar, not N); in a
    log file (SLURM, CI) a line every 30 s, not every batch."""
    interactive = sys.stderr.isatty()
    return tqdm(
        iterable,
        desc=desc,
        disable=not accelerator.is_main_process,
        leave=False,
        mininterval=0.1 if interactive else 30.0,
        **kwargs,
    )
