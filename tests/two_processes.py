"""Running ``clipcap`` on two CPU processes (DDP over gloo) from a test, and reading what it logged."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

TWO_PROCESSES = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def run_two_processes(arguments: list[str], world: Path) -> subprocess.CompletedProcess:
    """``python -m clipcap <arguments>`` on 2 CPU processes (DDP over gloo) in ``world``."""
    environment = {**os.environ, "CLIPCAP_WORLD": str(world), "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(
        [sys.executable, "-m", "clipcap", *arguments, *TWO_PROCESSES, *QUIET],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,  # ~30 s when it works; a rank left waiting in a collective would hang forever
    )
    assert finished.returncode == 0, finished.stderr[-4000:]
    return finished


def csv_rows(root: Path) -> list[dict[str, str]]:
    """The rows of the one ``metrics.csv`` under ``root``."""
    (path,) = root.rglob("metrics.csv")
    return list(csv.DictReader(path.open()))
