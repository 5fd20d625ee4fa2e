"""The interface every objective implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from clipcap.captioner import Captioner
from clipcap.data.batch import CaptionBatch
from clipcap.features.cache import FeatureCache


@dataclass(frozen=True)
class TrainingData:
    """What an objective is told of the data it trains on, at :meth:`Objective.setup`. The training layer
    builds it from its datamodule (:meth:`clipcap.training.data.CaptionDataModule.training_data`); an
    objective never reads a datamodule or a trainer.

    Attributes:
        clip_model: the CLIP whose features the batches carry, or None when the data does not name it.
        dataset: the dataset's name, which feature caches record (checked when one is opened).
        train_features: opens the training split's feature cache (DiscriTune's distractor bank), or None
            when there is no training data.
        labelled: training batches carry each image's reference captions (``batch.references``); False
            for an unlabelled pool (``data.init_args.unlabelled``).
        train_references: the training split's reference sets, one sequence of captions per image (the
            document frequencies of a CIDEr-D reward), or None when there are none.
    """

    clip_model: str | None = None
    dataset: str | None = None
    train_features: Callable[[], FeatureCache] | None = None
    labelled: bool = True
    train_references: Callable[[], list[Sequence[str]]] | None = None


@dataclass
class ObjectiveOutput:
    """What an objective returns.

    Attributes:
        loss: the scalar that is optimised.
        terms: named scalars worth logging (detached by the caller before logging).
        skip: the step must not update the weights (a non-finite reward or log-probability); the module
            skips the optimizer step, counts it and warns, once, with ``skip_reason``.
        skip_reason: why, in the module's warning.
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    skip: bool = False
    skip_reason: str = ""


class Objective(nn.Module, ABC):
    """A training objective for a captioner.

    An objective is an ``nn.Module`` so that any state it keeps (a REINFORCE baseline, say) lives in
    buffers and is saved in checkpoints with the model.
    """

    needs_captions: bool = True
    """Whether training batches must carry target captions (False for self-supervised objectives)."""

    def setup(self, data: TrainingData) -> None:
        """Called once the data is known (``CaptionModule.setup``); objectives that need the data's CLIP
        load it here. The default does nothing."""

    @abstractmethod
    def forward(self, captioner: Captioner, batch: CaptionBatch) -> ObjectiveOutput:
        """Computes the loss of ``captioner`` on ``batch``."""
