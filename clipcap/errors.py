"""Errors the ``clipcap`` command reports in one line (with :class:`OSError` and :class:`ValueError`)."""

from __future__ import annotations


class NothingLearnt(RuntimeError):
    """Every training step of an epoch was skipped: the run cannot learn, and stops instead of writing
    checkpoints of an untrained model."""
