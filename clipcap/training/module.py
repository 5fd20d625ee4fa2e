"""``CaptionModule``: the LightningModule that wires a captioner to an objective."""

from __future__ import annotations

import dataclasses
import random
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_warn

from clipcap.captioner import Captioner
from clipcap.checkpoints import read_checkpoint
from clipcap.convert import load_original_captioner_weights
from clipcap.data.batch import CaptionBatch
from clipcap.errors import NothingLearnt
from clipcap.generation import DecodingConfig
from clipcap.objectives.base import Objective, TrainingData
from clipcap.pretrained import resolve_pretrained
from clipcap.training.data import CaptionDataModule
from clipcap.training.schedules import WarmupLinearDecay


def _default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=2e-5, fused=True)


BUILT_FROM_CONFIG: ContextVar[bool] = ContextVar("clipcap_built_from_config", default=False)
"""True while :class:`clipcap.training.cli.ClipcapCLI` instantiates a config: a module built then saves the
parsed config (class paths and init args) as its hyperparameters, from which ``load_from_checkpoint``
rebuilds everything."""

_OBJECT_ARGUMENTS = ["captioner", "objective", "optimizer", "lr_scheduler"]


class CaptionModule(pl.LightningModule):
    """Trains ``captioner`` with ``objective``; the objective is an object, chosen by YAML ``class_path``.

    Checkpoints hold what training changes: the mapper, the LM's weights only if it is trainable (or its
    LoRA adapters), the objective's state, and the optimizer. A frozen LM (or LoRA's frozen base) is
    reloaded from its pretrained source instead, so a 7B model is never copied into each checkpoint.

    Args:
        captioner: the captioner to train (``ClipCaptioner``, ``clipcap.blip.BlipCaptioner``).
        objective: the training objective (``CrossEntropy``, ...).
        optimizer: builds the optimizer from the trainable parameters (fused AdamW, lr 2e-5 by default).
        lr_scheduler: optional, builds a scheduler from the optimizer.
        decoding: how captions are decoded by ``predict`` and by callbacks that do not set their own.
        init_from: a checkpoint whose captioner weights (mapper, trained LM weights) start this run, without
            its optimizer, objective state or step count: how DiscriTune starts from a cross-entropy model.
            (To resume a run, use ``--ckpt_path`` instead.)
    """

    def __init__(
        self,
        captioner: Captioner,
        objective: Objective,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        decoding: DecodingConfig | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        # Built from a config (BUILT_FROM_CONFIG), the hyperparameters are that config. Built by hand, the
        # objects themselves cannot be saved as hyperparameters (a module would be pickled whole), so they
        # are left out.
        self.save_hyperparameters(ignore=None if BUILT_FROM_CONFIG.get() else _OBJECT_ARGUMENTS)
        self.captioner = captioner
        self.objective = objective
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.decoding = decoding or DecodingConfig()
        self.init_from = init_from
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self._epoch_steps = self._epoch_skipped = (
            0  # training steps of the current epoch, and how many skipped
        )
        if init_from is not None:
            self._load_captioner_weights(init_from)

    def _load_captioner_weights(self, path: str) -> None:
        """Copies the captioner's weights from a checkpoint; every weight it trained must be there.

        A checkpoint whose LM was frozen does not store it: the LM then keeps the pretrained weights
        loaded at construction, which are the ones that checkpoint was trained with. An original ClipCap or
        DiscriTune ``.pt`` (a state dict without Lightning's ``state_dict`` entry) is converted on the fly
        (:func:`clipcap.convert.load_original_captioner_weights`).
        """
        checkpoint = read_checkpoint(path, "model.init_from")
        if not (isinstance(checkpoint, dict) and "state_dict" in checkpoint):
            try:
                load_original_captioner_weights(self.captioner, checkpoint, path)
            except ValueError as error:
                raise ValueError(f"model.init_from: {error}") from None
            return
        prefix = "captioner."
        weights = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        try:
            missing, unexpected = self.captioner.load_state_dict(weights, strict=False)
        except RuntimeError as error:  # shapes differ: another mapper or LM size
            raise ValueError(
                f"model.init_from={path}: its captioner does not match this one: {error}"
            ) from None
        frozen_lm = checkpoint.get("clipcap_frozen_lm")
        if frozen_lm:
            missing = [key for key in missing if not key.startswith("lm.")]
        if missing or unexpected:
            raise ValueError(
                f"model.init_from={path}: its captioner does not match this one "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        # `clipcap convert` checkpoints keep the converted GPT-2 in a folder; another LM would silently
        # pair the converted mapper with weights it was not trained with.
        if checkpoint.get("clipcap_converted_from") and frozen_lm:
            own_lm = Path(resolve_pretrained(self.captioner.lm.pretrained)).resolve()
            if own_lm != Path(frozen_lm).resolve():
                rank_zero_warn(
                    f"model.init_from={path} was converted from {checkpoint['clipcap_converted_from']} with its "
                    f"GPT-2 in {frozen_lm}, but this captioner's LM is {self.captioner.lm.pretrained!r}: set "
                    f"model.captioner.init_args.language_model.init_args.pretrained={frozen_lm}"
                )

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if isinstance(datamodule, CaptionDataModule):
            datamodule.captions_needed = self.objective.needs_captions
            self.objective.setup(datamodule.training_data())
        else:
            self.objective.setup(TrainingData())
        feature_dim = getattr(datamodule, "clip_dim", None)
        if feature_dim is not None and feature_dim != self.captioner.clip_dim:
            raise ValueError(
                f"The data's CLIP features have size {feature_dim}, but the mapper was built for "
                f"model.captioner.init_args.clip_dim={self.captioner.clip_dim}: set that option to "
                f"{feature_dim} or use features from the CLIP model the checkpoint was trained with"
            )
        self._check_precision()

    def _check_precision(self) -> None:
        """Refuses 16-bit LM weights of the other 16-bit type than the trainer's autocast.

        Autocast promotes the inputs of ``torch.cat`` to the widest of them, and knows only float32 and its
        own 16-bit type: two float16 tensors under bfloat16 autocast (or two bfloat16 under float16) raise
        "Unexpected floating ScalarType in at::autocast::prioritize" at the first prefix + caption join.
        Said here, before any step, with the two settings that fix it.
        """
        plugin = self.trainer.precision_plugin if self._trainer is not None else None
        lm_dtype = getattr(self.captioner.lm, "dtype", None)
        if not isinstance(plugin, MixedPrecision) or lm_dtype not in (torch.float16, torch.bfloat16):
            return
        autocast_dtype = torch.bfloat16 if plugin.precision == "bf16-mixed" else torch.float16
        if lm_dtype == autocast_dtype:
            return
        names = {torch.float16: ("float16", "16-mixed"), torch.bfloat16: ("bfloat16", "bf16-mixed")}
        raise ValueError(
            f"trainer.precision={plugin.precision} autocasts to {names[autocast_dtype][0]}, but the language "
            f"model's weights are {names[lm_dtype][0]}, which autocast cannot mix with it; set "
            f"model.captioner.init_args.language_model.init_args.dtype={names[autocast_dtype][0]} or "
            f"trainer.precision={names[lm_dtype][1]}"
            + (" (on a CPU, Lightning runs 16-mixed as bf16-mixed)" if plugin.device == "cpu" else "")
        )

    def _shared_step(self, batch: CaptionBatch | dict[str, CaptionBatch], stage: str) -> torch.Tensor | None:
        if isinstance(batch, dict):  # an unlabelled batch with its labelled anchor (anchor_batch_size)
            batch = dataclasses.replace(batch["images"], anchor=batch["anchor"])
        # Supervised objectives are validated on every (image, reference) pair; the others see each image
        # once, as they train.
        if stage != "train" and batch.references and self.objective.needs_captions:
            batch = batch.with_every_reference()
        output = self.objective(self.captioner, batch)
        if stage == "train":
            self._epoch_steps += 1
        if output.skip or not torch.isfinite(output.loss):
            self.skipped_steps += 1
            if stage == "train":
                self._epoch_skipped += 1
            reason = output.skip_reason or f"{type(self.objective).__name__}: non-finite loss"
            rank_zero_warn(
                f"{stage} step {self.global_step}: {reason}; no update from this batch "
                f"({int(self.skipped_steps)} skipped so far)"
            )
            self.log(
                f"{stage}/skipped_steps", self.skipped_steps.float(), on_step=True, batch_size=len(batch)
            )
            return None
        on_step = stage == "train"
        self.log(
            f"{stage}/loss",
            output.loss.detach(),
            prog_bar=True,
            on_step=on_step,
            on_epoch=True,
            batch_size=len(batch),
            sync_dist=stage != "train",
        )
        for name, value in output.terms.items():
            self.log(
                f"{stage}/{name}",
                value.detach(),
                on_step=on_step,
                on_epoch=True,
                batch_size=len(batch),
                sync_dist=stage != "train",
            )
        return output.loss

    def training_step(self, batch: CaptionBatch, batch_idx: int) -> torch.Tensor | None:
        return self._shared_step(batch, "train")

    def on_train_epoch_start(self) -> None:
        self._epoch_steps = self._epoch_skipped = 0

    def on_train_epoch_end(self) -> None:
        """Stops the run when every training step of the epoch was skipped (under DDP, on every rank)."""
        counts = torch.tensor([self._epoch_steps, self._epoch_skipped], dtype=torch.long, device=self.device)
        if self._trainer is not None:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        steps, skipped = (int(value) for value in counts.tolist())
        if steps > 0 and skipped == steps:
            raise NothingLearnt(
                f"all {steps} training steps of epoch {self.current_epoch} were skipped (non-finite loss or "
                "reward), so nothing was learnt; look for NaN or inf in the features and check the learning "
                "rate and the objective's settings"
            )

    def validation_step(self, batch: CaptionBatch, batch_idx: int) -> torch.Tensor | None:
        return self._shared_step(batch, "val")

    def test_step(self, batch: CaptionBatch, batch_idx: int) -> torch.Tensor | None:
        return self._shared_step(batch, "test")

    def predict_step(self, batch: CaptionBatch, batch_idx: int) -> list[dict[str, Any]]:
        captions = self.captioner.generate(batch.clip_features, self.decoding)
        return [
            {"image_id": image_id, "caption": texts[0], "captions": texts}
            for image_id, texts in zip(batch.image_ids, captions, strict=True)
        ]

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        if isinstance(scheduler, WarmupLinearDecay) and scheduler.total_steps is None:
            scheduler.total_steps = int(self.trainer.estimated_stepping_batches)
        # A schedule of optimizer steps (ClipCap's warm-up) is stepped every step, any other every epoch.
        interval = getattr(scheduler, "interval", "epoch")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's gradient clipping, plus two cases it refuses.

        - A fused optimizer (the configs' default) under ``bf16-mixed`` or ``16-mixed``, refused because a
          fused step unscales fp16 gradients itself: under bf16 nothing is scaled; under fp16 the gradients
          are unscaled here first, and torch's ``GradScaler`` then tells the fused step so.
        - Clipping by norm under FSDP, refused because each rank holds a shard of the gradients: the root
          FSDP module's ``clip_grad_norm_`` takes the norm over all shards.
        """
        if not gradient_clip_val:
            return
        strategy, precision = self.trainer.strategy, self.trainer.precision_plugin
        by_value = gradient_clip_algorithm == GradClipAlgorithmType.VALUE
        if isinstance(strategy, FSDPStrategy) and not by_value:
            root = strategy.model
            if not hasattr(root, "clip_grad_norm_"):
                raise RuntimeError(
                    f"CaptionModule: clipping by norm under FSDP needs the root module wrapped by FSDP, got "
                    f"{type(root).__name__}; set trainer.gradient_clip_algorithm=value or drop the clipping"
                )
            self._unscale(optimizer)
            root.clip_grad_norm_(gradient_clip_val)
            return
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        if not (fused and isinstance(precision, MixedPrecision)):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        self._unscale(optimizer)
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        if by_value:
            torch.nn.utils.clip_grad_value_(parameters, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(parameters, gradient_clip_val)

    def _unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Unscales fp16 gradients before clipping where the precision plugin left them scaled (a fused
        optimizer, which would unscale them in its step); a no-op without a scaler."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)

    def _frozen_keys(self) -> set[str]:
        """State-dict keys of frozen language-model weights (a frozen LM, or the base under LoRA
        adapters), which checkpoints do not store."""
        prefix = "captioner.lm."
        return {prefix + key for key in self.captioner.lm.frozen_state_keys()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = self._frozen_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint["clipcap_frozen_lm"] = self.captioner.lm.pretrained if frozen else None
        # Dropout, sampled rollouts and the next epoch's shuffle draw from these generators: with them, a
        # run resumed from this checkpoint continues as if it had never stopped.
        checkpoint["clipcap_rng_states"] = _rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints written before the module counted skipped steps still load, and so do those written
        # while objectives counted them a second time (the objective's counter is gone).
        own = self.state_dict()
        for key, value in own.items():
            if key.endswith("skipped_steps"):
                checkpoint["state_dict"].setdefault(key, torch.zeros_like(value))
        for key in [key for key in checkpoint["state_dict"] if key.startswith("objective.")]:
            if key.endswith(".skipped_steps") and key not in own:
                del checkpoint["state_dict"][key]
        # The frozen LM was loaded from its pretrained source when the module was built; put its weights
        # back into the state dict so strict loading still catches every other missing key.
        if checkpoint.get("clipcap_frozen_lm"):
            for key in self._frozen_keys():
                checkpoint["state_dict"].setdefault(key, own[key])
        # Only a resumed fit takes the generators back; loading weights to caption or test does not.
        resuming = self._trainer is not None and self.trainer.state.fn == "fit"
        if resuming and "clipcap_rng_states" in checkpoint:
            _set_rng_states(checkpoint["clipcap_rng_states"])


def _rng_states() -> dict[str, Any]:
    """The random generators' states: torch (CPU and every CUDA device), numpy and Python's."""
    # Plain tensors and tuples only, so that checkpoints still load with ``weights_only=True``.
    name, keys, position, has_gauss, cached_gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (
            name,
            torch.from_numpy(keys.astype(np.int64)),
            int(position),
            int(has_gauss),
            float(cached_gauss),
        ),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    """Restores what :func:`_rng_states` saved (CUDA states only onto as many devices as both have)."""
    torch.set_rng_state(states["torch"].cpu())
    name, keys, position, has_gauss, cached_gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    random.setstate(states["python"])
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available():
        for device, state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state.cpu(), device)
