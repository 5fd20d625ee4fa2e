"""The console: the commands drop the listed third-party notices and nothing else (``clipcap.console``)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from clipcap.console import IGNORED_LOG_RECORDS, IGNORED_WARNINGS, quiet_third_party

ROOT = Path(__file__).resolve().parents[1]
CE_CONFIG = str(ROOT / "lightning_configs" / "synthetic" / "ce.yaml")

NOISE = (
    "tensorboardX",
    "litlogger",
    "LeafSpec",
    "FutureWarning",
    "past_key_values",
    "Loading weights",
    "v_num",
    "TPU available",
    "LightningCLI's args parameter",
    "loss_type=None",
    "PTBTokenizer tokenized",
)


@pytest.fixture
def quiet_then_restored():
    """``quiet_third_party()`` for one test: warning filters and logger filters are put back after it."""
    loggers = [logging.getLogger(name) for name in IGNORED_LOG_RECORDS]
    saved = [list(logger.filters) for logger in loggers]
    with warnings.catch_warnings():
        quiet_third_party()
        yield
    for logger, filters in zip(loggers, saved, strict=True):
        logger.filters[:] = filters


def test_the_listed_warnings_are_dropped_and_others_kept(quiet_then_restored) -> None:
    examples = {
        r"Starting from v1\.9\.0, `tensorboardX` has been removed": "Starting from v1.9.0, `tensorboardX` has been removed as a dependency",
        r"`isinstance\(treespec, LeafSpec\)` is deprecated": "`isinstance(treespec, LeafSpec)` is deprecated, use ...",
        r"LightningCLI's args parameter is intended to run from within Python": "LightningCLI's args parameter is intended to run from within Python like ...",
        r"`is_gradient_checkpointing` is deprecated": "`is_gradient_checkpointing` is deprecated and will be removed in v6.",
    }
    assert set(examples) == {pattern for pattern, _ in IGNORED_WARNINGS}
    with warnings.catch_warnings(record=True) as caught:
        for message in examples.values():
            warnings.warn(message, FutureWarning, stacklevel=1)
        warnings.warn("clipcap: 3 of 64 steps were skipped (non-finite loss)", UserWarning, stacklevel=1)
        warnings.warn("`some_argument` is deprecated", FutureWarning, stacklevel=1)
    assert [str(warning.message) for warning in caught] == [
        "clipcap: 3 of 64 steps were skipped (non-finite loss)",
        "`some_argument` is deprecated",
    ]


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_the_listed_log_records_are_dropped_and_others_kept(quiet_then_restored) -> None:
    # Handlers on the loggers themselves: transformers' loggers do not propagate to the root logger.
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    modeling = logging.getLogger("transformers.modeling_utils")
    kept = _Kept()
    levels = [(logger, logger.level) for logger in (rank_zero, modeling)]
    for logger, _ in levels:
        logger.addHandler(kept)
        logger.setLevel(logging.INFO)
    try:
        rank_zero.info(
            "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"
        )
        rank_zero.info("TPU available: False, using: 0 TPU cores")
        rank_zero.info("GPU available: False, used: False")
        modeling.warning(
            "`loss_type=None` was set in the config but it is unrecognized. Using the default loss."
        )
        modeling.warning("Some weights were not initialized")
    finally:
        for logger, level in levels:
            logger.removeHandler(kept)
            logger.setLevel(level)
    assert kept.messages == ["GPU available: False, used: False", "Some weights were not initialized"]


def test_a_training_run_prints_progress_and_results_but_no_third_party_noise(
    tiny_world: Path, tmp_path: Path
) -> None:
    command = [
        sys.executable, "-m", "clipcap", "fit", "--config", CE_CONFIG, "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
        "--trainer.default_root_dir", str(tmp_path),
    ]  # fmt: skip
    environment = {**os.environ, "CLIPCAP_WORLD": str(tiny_world), "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output[-3000:]
    assert "Epoch 0" in output and "Sample captions, epoch 0" in output and "train/loss" in output
    # The run ends by saying where its files are.
    run_folder = tmp_path / "lightning_logs" / "version_0"
    assert f"[clipcap fit] run folder: {run_folder}" in output
    assert f"[clipcap fit] best checkpoint: {run_folder / 'checkpoints' / 'best.ckpt'}" in output
    assert f"[clipcap fit] last checkpoint: {run_folder / 'checkpoints' / 'last.ckpt'}" in output
    assert [noise for noise in NOISE if noise in output] == [], output[-3000:]
