"""Supervised cross-entropy with teacher forcing on reference captions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipcap.captioner import Captioner
from clipcap.data.batch import CaptionBatch
from clipcap.objectives.base import Objective, ObjectiveOutput


def token_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over target tokens, and token accuracy.

    Args:
        logits: (B, T, V) next-token logits aligned with ``labels``.
        labels: (B, T) target ids, -100 where there is no target.
        label_smoothing: mass spread uniformly over the vocabulary.

    Returns:
        (loss, accuracy), both scalars; the loss is computed in fp32 whatever the logits' dtype.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, label_smoothing=label_smoothing)
    with torch.no_grad():
        targets = flat_labels != -100
        accuracy = (flat_logits.argmax(-1)[targets] == flat_labels[targets]).float().mean()
    return loss, accuracy


class CrossEntropy(Objective):
    """Teacher-forced cross-entropy on one reference caption per row (EOS is a target).

    Args:
        label_smoothing: label smoothing in [0, 1).
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"CrossEntropy: label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward(self, captioner: Captioner, batch: CaptionBatch) -> ObjectiveOutput:
        if batch.captions is None:
            raise ValueError("CrossEntropy needs target captions, but the batch has none (unlabelled data?)")
        tokens = captioner.encode_captions(batch.captions)
        outputs = captioner(batch.clip_features, tokens)
        loss, accuracy = token_cross_entropy(outputs.logits, outputs.labels, self.label_smoothing)
        return ObjectiveOutput(loss=loss, terms={"ce": loss.detach(), "token_accuracy": accuracy})
