"""``CaptionEvaluation``: generate captions on the validation/test split and compute every metric once.

Each rank captions its shard of the split batch by batch; the metrics' states (dataset indices, captions,
CLIP similarities) are gathered across ranks and de-duplicated by image when computed, so a DDP run gives
the numbers of a single-process run on the same data. Rank 0 then writes ``predictions.json`` (COCO
results format), ``metrics.json`` and, at test time, ``report.html``.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

import clipcap
from clipcap.clip.encoder import ClipEncoder
from clipcap.data.batch import CaptionBatch
from clipcap.features.cache import FeatureCache, cache_expectation
from clipcap.files import atomic_write_json
from clipcap.generation import DecodingConfig
from clipcap.metrics.caption_metrics import ClipCaptionScores, NLGScores
from clipcap.metrics.report import ReportRow, write_report
from clipcap.training.data import CaptionDataModule

logger = logging.getLogger(__name__)

TEST_DECODING_KEY = "test_decoding"
"""The entry of a ``CaptionEvaluation``'s checkpointed state that holds its test decoding (read by
``clipcap caption``)."""

DEFAULT_NLG_METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


@dataclass
class _StageState:
    """What one evaluation pass (a validation or test epoch) accumulates."""

    split: str
    image_ids: list[str]
    index_of: dict[str, int]
    nlg: NLGScores
    clip: ClipCaptionScores | None
    scoring_features: FeatureCache | None

    def add(self, image_ids: list[str], captions: list[str], device: torch.device | str) -> None:
        """Scores one batch of generated captions, one per image id."""
        unknown = [image_id for image_id in image_ids if image_id not in self.index_of]
        if unknown:
            raise ValueError(f"CaptionEvaluation: images {unknown[:3]} are not in the {self.split} split")
        indices = torch.tensor([self.index_of[i] for i in image_ids], device=device)
        self.nlg.update(indices, captions)
        if self.clip is not None and self.scoring_features is not None:
            image_embeds = torch.from_numpy(np.stack([self.scoring_features.get(i) for i in image_ids]))
            self.clip.update(indices, image_embeds.to(device), captions)

    def compute(self) -> dict[str, float]:
        """Every metric over everything added (gathered across ranks)."""
        metrics = dict(self.nlg.compute())
        if self.clip is not None:
            metrics.update(self.clip.compute())
        return {name: float(value) for name, value in metrics.items()}


class CaptionEvaluation(pl.Callback):
    """Captions the validation and test splits and scores them with NLG and CLIP metrics.

    Args:
        val_decoding: decoding at validation (greedy, 40 tokens by default).
        test_decoding: decoding at test (beam 5 by default, as DiscriTune evaluates).
        nlg_metrics: pycocoevalcap metrics (``BLEU`` gives Bleu_1..4, ``METEOR``, ``ROUGE_L``, ``CIDEr``,
            ``SPICE``; SPICE is skipped with one message when Stanford CoreNLP is not installed).
        scoring_clip: the CLIP that computes CLIPScore, RefCLIPScore, RefCompare and retrieval; the data's
            ``clip_model`` when None. It may differ from the CLIP the captioner reads.
        scoring_features_dir: feature caches (``<dir>/<split>``) made by ``scoring_clip`` when it is not
            the data's CLIP (``clipcap features --clip <scoring_clip>
            --data.init_args.features_dir=<dir>``).
        clip_metrics: compute the CLIP-based metrics (needs a scoring CLIP).
        prompt: text put before every caption and reference when CLIP scores it (Hessel et al. 2021).
        block_size: images per block of the DiscriTune retrieval protocol.
        num_distractors: distractors of the random-distractor retrieval mode.
        val_every_n_epochs: evaluate every n-th validation (generation is the costly part).
        report_at_validation: also write ``report.html`` after validations (always after test).
        output_dir: where to write; ``<log dir>/<stage>`` when None.
    """

    def __init__(
        self,
        val_decoding: DecodingConfig | None = None,
        test_decoding: DecodingConfig | None = None,
        nlg_metrics: list[str] | None = None,
        scoring_clip: str | None = None,
        scoring_features_dir: str | None = None,
        clip_metrics: bool = True,
        prompt: str = "A photo depicts",
        block_size: int = 100,
        num_distractors: int = 99,
        val_every_n_epochs: int = 1,
        report_at_validation: bool = False,
        output_dir: str | None = None,
    ) -> None:
        self.decoding = {
            "val": val_decoding or DecodingConfig(),
            "test": test_decoding or DecodingConfig(num_beams=5),
        }
        self.nlg_metrics = tuple(nlg_metrics) if nlg_metrics is not None else DEFAULT_NLG_METRICS
        self.scoring_clip = scoring_clip
        self.scoring_features_dir = scoring_features_dir
        self.clip_metrics = clip_metrics
        self.prompt = prompt
        self.block_size = block_size
        self.num_distractors = num_distractors
        self.val_every_n_epochs = val_every_n_epochs
        self.report_at_validation = report_at_validation
        self.output_dir = output_dir
        self._encoder = None
        self.written: list[Path] = []  # the files the last evaluation wrote
        self._state: _StageState | None = None
        self.last_metrics: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints so that ``clipcap caption`` decodes as ``clipcap test`` does."""
        return {TEST_DECODING_KEY: dataclasses.asdict(self.decoding["test"])}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed run keeps the decoding of its own config."""

    # ------------------------------------------------------------------------------------------- hooks

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.val_every_n_epochs:
            self._state = None
            return
        self._state = self._start(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._state = self._start(trainer, pl_module, "test")

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._update(pl_module, batch, "val")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(pl_module, batch, "test")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, pl_module, "test")

    # ------------------------------------------------------------------------------------------- steps

    def scoring_encoder(self, datamodule: CaptionDataModule):
        """The scoring CLIP, loaded once (None when no CLIP is named anywhere)."""
        name = self.scoring_clip or datamodule.clip_model
        if name is None:
            return None
        if self._encoder is None or self._encoder.name != name:
            self._encoder = ClipEncoder(name)
        return self._encoder

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> _StageState:
        datamodule = trainer.datamodule
        if not isinstance(datamodule, CaptionDataModule):
            raise TypeError("CaptionEvaluation needs a CaptionDataModule")
        return self.new_state(datamodule, stage, pl_module.device)

    def new_state(
        self, datamodule: CaptionDataModule, split: str, device: torch.device | str = "cpu"
    ) -> _StageState:
        """Fresh metrics for one pass over ``split``: NLG, and CLIP metrics when a scoring CLIP is known."""
        images = datamodule.split(split).images
        image_ids = [entry.image_id for entry in images]
        groups = [entry.group for entry in images]
        groups_or_none = groups if any(g is not None for g in groups) else None
        nlg = NLGScores(datamodule.reference_sets(split), metrics=self.nlg_metrics, groups=groups_or_none)
        clip = None
        scoring_features = None
        encoder = self.scoring_encoder(datamodule) if self.clip_metrics else None
        if self.clip_metrics and encoder is None:
            logger.warning(
                "CaptionEvaluation: no scoring CLIP (set data.init_args.clip_model or the callback's "
                "scoring_clip); CLIP metrics are skipped"
            )
        if encoder is not None:
            scoring_features = self._scoring_features(datamodule, split, encoder)
            encoder.to(device)
            clip = ClipCaptionScores(
                encoder,
                [entry.references for entry in images],
                groups=groups_or_none,
                prompt=self.prompt,
                block_size=self.block_size,
                num_distractors=self.num_distractors,
            ).to(device)
        return _StageState(
            split=split,
            image_ids=image_ids,
            index_of={image_id: index for index, image_id in enumerate(image_ids)},
            nlg=nlg.to(device),
            clip=clip,
            scoring_features=scoring_features,
        )

    def _scoring_features(self, datamodule: CaptionDataModule, stage: str, encoder) -> FeatureCache:
        """Pooled image features of the scoring CLIP: the data's own cache when it is the same CLIP."""
        if self.scoring_clip is None or self.scoring_clip == datamodule.clip_model:
            return datamodule.split(stage).features
        if self.scoring_features_dir is None:
            raise ValueError(
                f"CaptionEvaluation: scoring_clip={self.scoring_clip!r} differs from the data's CLIP, so "
                "its image features are needed: extract them with `clipcap features --clip "
                f"{self.scoring_clip} --data.init_args.features_dir=<dir>` and set scoring_features_dir"
            )
        return FeatureCache.open(
            Path(self.scoring_features_dir) / stage,
            expect=cache_expectation(encoder, dataset=datamodule.dataset_name, split=stage),
        )

    def _update(self, pl_module: pl.LightningModule, batch: CaptionBatch, stage: str) -> None:
        state = self._state
        if state is None or state.split != stage:
            return
        with torch.no_grad():
            generated = pl_module.captioner.generate(batch.clip_features, self.decoding[stage])
        state.add(batch.image_ids, [texts[0] for texts in generated], pl_module.device)

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        state = self._state
        if state is None or state.split != stage:
            return
        self._state = None
        self.last_metrics = state.compute()
        # Every rank holds the same gathered numbers, so each logs them (a checkpoint may monitor them).
        for name, value in self.last_metrics.items():
            pl_module.log(f"{stage}/{name}", value, sync_dist=False)
        # Both gather across ranks, so every rank calls them; rank 0 writes.
        captions = state.nlg.captions()
        per_image = state.clip.per_image() if state.clip is not None else {}
        # trainer.log_dir is a collective under DDP: every rank must ask for it, not only the writer.
        folder = self.output_folder(trainer, stage)
        log_dir = trainer.log_dir
        if trainer.is_global_zero:
            self._write(trainer, folder, stage, state, captions, per_image, log_dir)
        state.nlg.reset()
        if state.clip is not None:
            state.clip.reset()

    def _write(
        self,
        trainer: pl.Trainer,
        folder: Path,
        stage: str,
        state: _StageState,
        captions: dict[int, str],
        per_image: dict[int, dict[str, float]],
        log_dir: str | None,
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        predictions = [{"image_id": state.image_ids[i], "caption": captions[i]} for i in sorted(captions)]
        atomic_write_json(folder / "predictions.json", predictions, indent=1)
        atomic_write_json(
            folder / "metrics.json",
            {
                "stage": stage,
                "epoch": trainer.current_epoch,
                "images": len(captions),
                "decoding": vars(self.decoding[stage]),
                "metrics": self.last_metrics,
            },
            indent=1,
        )
        written = [folder / "predictions.json", folder / "metrics.json"]
        if stage == "test" or self.report_at_validation:
            entries = trainer.datamodule.split(stage).images
            rows = [
                ReportRow(
                    image_id=entries[i].image_id,
                    caption=captions[i],
                    references=list(entries[i].references),
                    scores=per_image.get(i, {}),
                    image=entries[i].image,
                    group=entries[i].group,
                )
                for i in sorted(captions)
            ]
            about = self.describe_run(trainer, stage, len(rows), log_dir)
            written.append(write_report(folder / "report.html", rows, self.last_metrics, about=about))
        self.written = written
        rank_zero_info(f"[evaluation] {stage}: wrote " + ", ".join(str(path) for path in written))

    def describe_run(
        self, trainer: pl.Trainer, stage: str, images: int, log_dir: str | None
    ) -> dict[str, str]:
        """What an evaluation's report shows first: checkpoint, config, split, decoding, date, version.
        (``log_dir`` is passed in: ``trainer.log_dir`` is a collective under DDP, and this runs on rank 0.)"""
        checkpoint = trainer.ckpt_path or (
            f"the model being trained (epoch {trainer.current_epoch})"
            if trainer.state.fn == "fit"
            else "the model in memory"
        )
        datamodule = trainer.datamodule
        about = {"checkpoint": str(checkpoint)}
        for callback in trainer.callbacks:
            if isinstance(callback, SaveConfigCallback):
                given = callback.config.get("config") or []
                saved = Path(log_dir or trainer.default_root_dir) / callback.config_filename
                about["config"] = ", ".join(str(path) for path in given) + (
                    f" (as run: {saved})" if saved.is_file() else ""
                )
        about.update(
            {
                "split": f"{getattr(datamodule, 'dataset_name', type(datamodule).__name__)}/{stage}, {images} images",
                "decoding": self.decoding[stage].describe(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "clipcap": clipcap.__version__,
            }
        )
        return about

    def output_folder(self, trainer: pl.Trainer, stage: str) -> Path:
        """``output_dir`` or the run's log folder, then ``<stage>`` (``val/epoch=N`` at validation)."""
        root = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        return root / stage if stage == "test" else root / stage / f"epoch={trainer.current_epoch}"


def score_captions(
    evaluation: CaptionEvaluation, datamodule: CaptionDataModule, split: str, captions: dict[str, str]
) -> dict[str, float]:
    """Scores captions given outside a trainer (a baseline, a results file) with the callback's metrics.

    Args:
        evaluation: the metrics' settings.
        datamodule: the data (its references, groups and, for CLIP metrics, features).
        split: the split the captions are for.
        captions: image id → caption, for every image of the split.

    Raises:
        ValueError: an id is not in the split, or an image of the split has no caption.
    """
    images = datamodule.split(split).images
    unknown = sorted(set(captions) - {entry.image_id for entry in images})
    if unknown:
        raise ValueError(f"captions for images that are not in the {split} split: {unknown[:3]}")
    missing = [entry.image_id for entry in images if entry.image_id not in captions]
    if missing:
        raise ValueError(f"{len(missing)} images of the {split} split have no caption, e.g. {missing[:3]}")
    state = evaluation.new_state(datamodule, split)
    state.add([entry.image_id for entry in images], [captions[entry.image_id] for entry in images], "cpu")
    return state.compute()
