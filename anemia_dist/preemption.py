"""Preemption: a signal on any rank becomes a checkpoint and a documented exit code on all ranks."""

from __future__ import annotations

PREEMPTED_EXIT_CODE = 75
"""Exit status after a preemption checkpoint (EX_TEMPFAIL): the SLURM scripts requeue on it."""
