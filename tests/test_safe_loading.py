"""Files from users are never unpickled, and the commands fail with one clear line.

A checkpoint carrying a pickled ``os.system`` payload must not run it through ``clipcap caption``,
``--model.init_from`` or ``clipcap export``; truncated or garbage checkpoints, a misspelt objective and an
invalid learning rate end the command with one line and a non-zero status, before any model loads.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipcap.checkpoints import CheckpointError, read_checkpoint
from clipcap.training.cli import lightning_cli, objective_names

ROOT = Path(__file__).resolve().parents[1]
CE_CONFIG = str(ROOT / "lightning_configs" / "synthetic" / "ce.yaml")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.logger=false"]


class Payload:
    """Unpickling this creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained(trained_checkpoint: Path) -> Path:
    return trained_checkpoint


@pytest.fixture
def poisoned(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A real clipcap checkpoint with a payload added, and the marker the payload would create."""
    marker = tmp_path / "payload-ran"
    checkpoint = torch.load(trained, weights_only=True)
    checkpoint["hyper_parameters"]["note"] = Payload(marker)
    path = tmp_path / "poisoned.ckpt"
    torch.save(checkpoint, path)
    return path, marker


def run_clipcap(*arguments: str, world: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "CLIPCAP_WORLD": str(world), "OMP_NUM_THREADS": "1"}
    environment.pop("CLIPCAP_TRACEBACK", None)
    return subprocess.run(
        [sys.executable, "-m", "clipcap", *arguments],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------ reading


def test_a_payload_is_refused_and_never_runs(poisoned: tuple[Path, Path]) -> None:
    path, marker = poisoned
    with pytest.raises(CheckpointError, match=r"refused: it holds pickled Python objects \(posix\.system\)"):
        read_checkpoint(path, "--ckpt")
    assert not marker.exists()
    assert torch.load(path, weights_only=False) is not None and marker.exists()  # the payload is real


def test_truncated_garbage_and_empty_files_are_named(trained: Path, tmp_path: Path) -> None:
    data = trained.read_bytes()
    cases = {
        "truncated.ckpt": data[: len(data) // 2],
        "garbage.ckpt": b"not a checkpoint\n" * 20,
        "empty.ckpt": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=rf"--ckpt_path .*{name}: not a readable checkpoint"):
            read_checkpoint(tmp_path / name, "--ckpt_path")
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        read_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        read_checkpoint(tmp_path)


def test_clipcap_checkpoints_and_state_dicts_load(trained: Path, tmp_path: Path) -> None:
    """(EGG's pickled ``Checkpoint`` tuple, the one allow-listed class, is read in tests/test_convert.py.)"""
    assert "state_dict" in read_checkpoint(trained)
    torch.save({"w": torch.ones(2)}, tmp_path / "weights.pt")
    assert torch.equal(read_checkpoint(tmp_path / "weights.pt", mmap=True)["w"], torch.ones(2))


def test_caption_init_from_and_export_refuse_the_payload(
    poisoned: tuple[Path, Path], tiny_world: Path, tmp_path: Path
) -> None:
    from clipcap.commands.caption import caption_images
    from clipcap.export import export_checkpoint

    path, marker = poisoned
    with pytest.raises(CheckpointError, match="--ckpt .*refused"):
        caption_images(str(path), [str(tmp_path / "any.jpg")])
    with pytest.raises(CheckpointError, match="model.init_from .*refused"):
        lightning_cli(["fit", "--config", CE_CONFIG, f"--model.init_from={path}", *QUIET], run=False)
    with pytest.raises(CheckpointError, match="--ckpt .*refused"):
        export_checkpoint(path, tmp_path / "export")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ commands


def test_a_truncated_checkpoint_gives_one_line_for_test_and_caption(
    trained: Path, tiny_world: Path, tmp_path: Path
) -> None:
    truncated = tmp_path / "truncated.ckpt"
    data = trained.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    tested = run_clipcap(
        "test", "--config", CE_CONFIG, "--ckpt_path", str(truncated), *QUIET, world=tiny_world
    )
    assert tested.returncode == 1 and "Traceback" not in tested.stderr, tested.stderr[-2000:]
    assert last_line(tested.stderr).startswith(
        f"clipcap test: --ckpt_path {truncated}: not a readable checkpoint"
    )
    image = tmp_path / "image.png"
    captioned = run_clipcap("caption", "--ckpt", str(truncated), str(image), world=tiny_world)
    assert captioned.returncode == 1 and "Traceback" not in captioned.stderr, captioned.stderr[-2000:]
    assert last_line(captioned.stderr).startswith(
        f"clipcap caption: --ckpt {truncated}: not a readable checkpoint"
    )


def test_a_misspelt_objective_lists_the_valid_names(tiny_world: Path) -> None:
    finished = run_clipcap("fit", "--config", CE_CONFIG, "--model.objective=CrossEntropyy", world=tiny_world)
    assert finished.returncode == 2 and "Traceback" not in finished.stderr
    assert "CrossEntropyy" in finished.stderr
    assert f"Objectives: {', '.join(objective_names())}" in finished.stderr
    assert {"CrossEntropy", "DiscriTune", "GumbelClip"} <= set(objective_names())


def test_an_invalid_learning_rate_is_refused_before_the_models_load(tiny_world: Path) -> None:
    finished = run_clipcap(
        "fit", "--config", CE_CONFIG, "--model.optimizer.init_args.lr=-0.001", *QUIET, world=tiny_world
    )
    assert finished.returncode == 1 and "Traceback" not in finished.stderr, finished.stderr[-2000:]
    assert last_line(finished.stderr) == (
        "clipcap fit: model.optimizer (torch.optim.AdamW): Invalid learning rate: -0.001"
    )


def test_the_traceback_is_shown_on_request(tiny_world: Path, tmp_path: Path) -> None:
    environment = {**os.environ, "CLIPCAP_WORLD": str(tiny_world), "CLIPCAP_TRACEBACK": "1"}
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipcap",
            "test",
            "--config",
            CE_CONFIG,
            "--ckpt_path",
            str(tmp_path / "no.ckpt"),
        ],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.returncode == 1 and "Traceback" in finished.stderr
    assert (
        last_line(finished.stderr)
        == f"clipcap test: --ckpt_path {tmp_path / 'no.ckpt'}: no such checkpoint file"
    )


def test_a_read_only_features_dir_gives_one_line(
    tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """As a user (not root, who may write anywhere), the folder is made read-only; as root, creating
    anything inside it is made to fail as the kernel would for that user."""
    from clipcap.commands import main

    features_dir = tmp_path / "features"
    features_dir.mkdir()
    if os.geteuid() != 0:
        features_dir.chmod(0o555)
    else:
        real_mkdir = Path.mkdir

        def refused(self: Path, *args, **kwargs) -> None:
            if features_dir in self.parents:
                raise PermissionError(13, "Permission denied", str(self))
            real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(SystemExit) as stopped:
        main(["features", "--config", CE_CONFIG, "--splits", "val", "--no_progress",
              f"--data.init_args.features_dir={features_dir}"])  # fmt: skip
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert last_line(err) == f"clipcap features: Permission denied: {features_dir / '.val.partial'}"
