"""The interface every objective implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn

from clipcap.captioner import Captioner
from clipcap.data.batch import CaptionBatch


@dataclass
class ObjectiveOutput:
    """What an objective returns.

    Attributes:
        loss: the scalar that is optimised.
        terms: named scalars worth logging (detached by the caller before logging).
        skip: the step must not update the weights (a non-finite reward or log-probability); the module
            skips the optimizer step, warns and counts it.
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    skip: bool = False


class Objective(nn.Module, ABC):
    """A training objective for a captioner.

    An objective is an ``nn.Module`` so that any state it keeps (a REINFORCE baseline, say) lives in
    buffers and is saved in checkpoints with the model.
    """

    needs_captions: bool = True
    """Whether training batches must carry target captions (False for self-supervised objectives)."""

    def setup(self, datamodule: object | None) -> None:
        """Called once the data is known (``CaptionModule.setup``); objectives that need the data's CLIP
        load it here. The default does nothing."""

    @abstractmethod
    def forward(self, captioner: Captioner, batch: CaptionBatch) -> ObjectiveOutput:
        """Computes the loss of ``captioner`` on ``batch``."""
