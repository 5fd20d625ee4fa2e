"""A readable console: what a user needs (progress, where results go, the metrics), not third-party noise.

``quiet_third_party()`` runs at the entry points (the ``clipcap`` command, ``python -m clipcap``). It drops
only the notices listed here, each by its message and with the reason it is noise for clipcap's users;
every other warning, clipcap's own included, stays visible. The library itself never changes warning
filters or logging, so code that imports clipcap sees everything.
"""

from __future__ import annotations

import logging
import re
import warnings

# (message pattern, why it is noise here). Warnings are matched on the start of their message.
IGNORED_WARNINGS: tuple[tuple[str, str], ...] = (
    (
        r"Starting from v1\.9\.0, `tensorboardX` has been removed",
        "Lightning falls back to its CSVLogger, which is what clipcap's configs expect",
    ),
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        "Lightning's own use of a torch API (lightning/pytorch/utilities/_pytree.py)",
    ),
    (
        r"LightningCLI's args parameter is intended to run from within Python",
        "`clipcap demo` and `clipcap features` run LightningCLI on arguments they build, by design",
    ),
    (
        r"`is_gradient_checkpointing` is deprecated",
        "peft reads this transformers property when it wraps a model; nothing a user can change",
    ),
)

# Logger name -> (message pattern, why); records logged on that logger whose message matches are dropped.
IGNORED_LOG_RECORDS: dict[str, tuple[tuple[str, str], ...]] = {
    "lightning.pytorch.utilities.rank_zero": (
        (r"💡 Tip: ", "an advertisement for Lightning's cloud services"),
        (r"(TPU|HPU) available: ", "accelerators clipcap does not use; the GPU line stays"),
    ),
    "lightning.fabric.utilities.rank_zero": (
        (r"💡 Tip: ", "an advertisement for Lightning's cloud services"),
    ),
    "transformers.modeling_utils": (
        (
            r"`loss_type=None` was set in the config but it is unrecognized",
            "said of every causal LM that computes its own loss; the default it names is the right one",
        ),
    ),
}


class _DropMatching(logging.Filter):
    """Drops the records whose message matches one of ``patterns``."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{pattern})" for pattern in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.search(record.getMessage()) is None


def quiet_third_party() -> None:
    """Filters the listed third-party notices and turns off transformers' per-load progress bars
    ("Loading weights"). Idempotent."""
    for pattern, _ in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=Warning)
    for name, entries in IGNORED_LOG_RECORDS.items():
        logger = logging.getLogger(name)
        for existing in [f for f in logger.filters if isinstance(f, _DropMatching)]:
            logger.removeFilter(existing)
        logger.addFilter(_DropMatching(tuple(pattern for pattern, _ in entries)))
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
