"""Callbacks: evaluation that generates captions lives here, not in the module's hooks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

from clipcap.data.batch import collate_caption_batch
from clipcap.files import atomic_write_json
from clipcap.generation import DecodingConfig
from clipcap.training.data import CaptionDataModule, CaptionImages


class _WithoutVersionNumber:
    """Drops ``v_num``, the logger's version number, from a progress bar: it says nothing about training
    (the run's folder is printed where it matters)."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        metrics.pop("v_num", None)
        return metrics


class ProgressBar(_WithoutVersionNumber, TQDMProgressBar):
    """Lightning's tqdm progress bar without ``v_num``."""


class RichProgress(_WithoutVersionNumber, RichProgressBar):
    """Lightning's rich progress bar without ``v_num``."""


def default_progress_bar() -> ProgressBar | RichProgress:
    """The bar Lightning would choose (rich when the ``rich`` package is installed, else tqdm), without
    ``v_num``; ``clipcap`` adds it unless a config turns the bar off or names a progress bar itself."""
    return RichProgress() if importlib.util.find_spec("rich") is not None else ProgressBar()


class SampleCaptions(pl.Callback):
    """Captions a fixed handful of validation images after each validation and shows them.

    The samples are printed and appended to ``samples.jsonl`` in the run's log folder, one line per
    epoch, so a run's progress can be read as text. Under DDP rank 0 captions and writes.

    Args:
        num_images: how many validation images (the first ones, always the same).
        decoding: how to decode them (greedy by default).
    """

    def __init__(self, num_images: int = 4, decoding: DecodingConfig | None = None) -> None:
        self.num_images = num_images
        self.decoding = decoding or DecodingConfig()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.num_images < 1:
            return
        datamodule = trainer.datamodule
        if not isinstance(datamodule, CaptionDataModule):
            return
        # trainer.log_dir is a collective under DDP (a broadcast): every rank must ask for it, or rank 0
        # waits here while the others wait in the next collective (CaptionEvaluation's gather).
        log_dir = trainer.log_dir
        if not trainer.is_global_zero:
            return
        images = CaptionImages(datamodule.split("val"))
        batch = collate_caption_batch([images[i] for i in range(min(self.num_images, len(images)))])
        with torch.no_grad():
            captions = pl_module.captioner.generate(batch.clip_features.to(pl_module.device), self.decoding)
        samples = [
            {"image_id": image_id, "caption": texts[0], "reference": references[0] if references else ""}
            for image_id, texts, references in zip(batch.image_ids, captions, batch.references, strict=True)
        ]
        lines = [f"  {s['image_id']}: {s['caption']!r}  (ref: {s['reference']!r})" for s in samples]
        rank_zero_info(f"Sample captions, epoch {trainer.current_epoch}:\n" + "\n".join(lines))
        if log_dir:
            path = Path(log_dir) / "samples.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as handle:
                handle.write(
                    json.dumps(
                        {"epoch": trainer.current_epoch, "step": trainer.global_step, "samples": samples}
                    )
                    + "\n"
                )


class CaptionWriter(BasePredictionWriter):
    """Writes ``clipcap predict`` captions as ``predictions.json`` in the COCO results format.

    The file is ``[{"image_id", "caption"}]`` (plus ``captions`` when several were decoded per image),
    written atomically into ``output_dir`` (the run's log folder when None). Under DDP each rank writes
    ``predictions.rank<k>.json``; rank files are de-duplicated by image id when merged.

    Args:
        output_dir: the folder to write into.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir
        self.written: list[Path] = []  # the file this rank wrote last

    def write_on_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions, batch_indices
    ) -> None:
        rows = [row for batch in predictions for row in batch]
        folder = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        name = (
            "predictions.json" if trainer.world_size == 1 else f"predictions.rank{trainer.global_rank}.json"
        )
        atomic_write_json(folder / name, rows, indent=1)
        self.written = [folder / name]
        rank_zero_info(f"Wrote {len(rows)} captions to {folder / name}")
