"""Runs that cannot be right stop with a message: non-finite features, and epochs whose steps were all
skipped."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from clipcap.features.cache import FEATURES_FILE, FeatureCache, FeatureCacheError
from clipcap.objectives import CrossEntropy
from clipcap.objectives.base import ObjectiveOutput
from clipcap.training.cli import lightning_cli
from clipcap.training.module import NothingLearnt

ROOT = Path(__file__).resolve().parents[1]
CE_CONFIG = str(ROOT / "lightning_configs" / "synthetic" / "ce.yaml")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.logger=false", "--trainer.limit_val_batches=0"]


def test_a_cache_with_nan_or_inf_is_never_written(tmp_path: Path) -> None:
    features = np.ones((5, 4), dtype=np.float32)
    features[3, 1] = np.nan
    with pytest.raises(
        FeatureCacheError, match=r"features\.npy: row 3 \(image 'd'\) holds a non-finite value"
    ):
        FeatureCache.write(tmp_path / "cache", list("abcde"), features, {})
    assert not (tmp_path / "cache").exists()
    grid = np.ones((5, 2, 4), dtype=np.float32)
    grid[4, 0, 0] = np.inf
    with pytest.raises(FeatureCacheError, match=r"grid_features\.npy: row 4 \(image 'e'\)"):
        FeatureCache.write(tmp_path / "cache", list("abcde"), np.ones((5, 4), np.float32), {}, grid=grid)


def test_a_cache_edited_to_hold_nan_is_refused_when_opened(tmp_path: Path) -> None:
    cache = FeatureCache.write(
        tmp_path / "cache", list("abc"), np.ones((3, 4), np.float32), {}, grid=np.ones((3, 2, 4), np.float32)
    )
    grid = np.load(cache.folder / "grid_features.npy", mmap_mode="r+")
    grid[1, 1, 2] = np.nan
    grid.flush()
    del grid
    with pytest.raises(FeatureCacheError, match=r"row 1 \(image 'b'\) holds a non-finite value"):
        FeatureCache.open(tmp_path / "cache").get_grid("b")
    features = np.load(cache.folder / FEATURES_FILE, mmap_mode="r+")
    features[2, 0] = -np.inf
    features.flush()
    del features
    with pytest.raises(
        FeatureCacheError, match=r"features\.npy: row 2 \(image 'c'\) holds a non-finite value"
    ):
        FeatureCache.open(tmp_path / "cache")


def test_fit_on_nan_features_stops_naming_the_cache_and_row(tiny_world: Path, tmp_path: Path) -> None:
    features_dir = tmp_path / "features"
    shutil.copytree(tiny_world / "features", features_dir)
    train = np.load(features_dir / "train" / FEATURES_FILE, mmap_mode="r+")
    train[7, :] = np.nan
    train.flush()
    del train
    with pytest.raises(FeatureCacheError, match=rf"{features_dir / 'train' / FEATURES_FILE}: row 7 \(image "):
        lightning_cli(
            ["fit", "--config", CE_CONFIG, f"--data.init_args.features_dir={features_dir}",
             "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
             "--trainer.default_root_dir", str(tmp_path / "run"), *QUIET]
        )  # fmt: skip


def test_an_epoch_whose_steps_were_all_skipped_stops_the_run(
    tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def non_finite(self, captioner, batch) -> ObjectiveOutput:
        return ObjectiveOutput(loss=captioner.prefix(batch.clip_features).sum() * float("nan"))

    monkeypatch.setattr(CrossEntropy, "forward", non_finite)
    with pytest.raises(NothingLearnt, match="all 3 training steps of epoch 0 were skipped"):
        lightning_cli(
            ["fit", "--config", CE_CONFIG, "--trainer.max_epochs=2", "--trainer.limit_train_batches=3",
             "--trainer.default_root_dir", str(tmp_path), *QUIET]
        )  # fmt: skip


def test_an_epoch_with_some_skipped_steps_goes_on(
    tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = CrossEntropy.forward
    calls = {"count": 0}

    def sometimes_non_finite(self, captioner, batch) -> ObjectiveOutput:
        calls["count"] += 1
        output = original(self, captioner, batch)
        return ObjectiveOutput(loss=output.loss * float("nan")) if calls["count"] == 2 else output

    monkeypatch.setattr(CrossEntropy, "forward", sometimes_non_finite)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = lightning_cli(
            ["fit", "--config", CE_CONFIG, "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
             "--trainer.default_root_dir", str(tmp_path), *QUIET]
        )  # fmt: skip
    assert cli.trainer.state.finished and int(cli.model.skipped_steps) == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    said = [str(w.message) for w in caught if "no update from this batch" in str(w.message)]
    assert said == [
        "train step 1: CrossEntropy: non-finite loss; no update from this batch (1 skipped so far)"
    ]
    # A checkpoint written while objectives kept a second counter still loads (the key is dropped).
    state = {**cli.model.state_dict(), "objective.skipped_steps": torch.tensor(1)}
    checkpoint = {"state_dict": state}
    cli.model.on_load_checkpoint(checkpoint)
    assert "objective.skipped_steps" not in checkpoint["state_dict"]
    cli.model.load_state_dict(checkpoint["state_dict"])


def test_a_training_split_with_nothing_to_train_on_stops_the_run(tiny_world: Path, tmp_path: Path) -> None:
    """Lightning skips a fit whose training loader is empty and exits 0 with an untrained model."""
    with pytest.raises(ValueError, match=r"synthetic/train: no \(image, reference\) pairs to train on"):
        lightning_cli(
            ["fit", "--config", CE_CONFIG, "--data.init_args.labelled_images=0", "--trainer.max_epochs=1",
             "--trainer.default_root_dir", str(tmp_path), *QUIET]
        )  # fmt: skip
