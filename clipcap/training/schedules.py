"""Learning-rate schedules that the originals used and torch does not offer under one name."""

from __future__ import annotations

import torch


class WarmupLinearDecay(torch.optim.lr_scheduler.LambdaLR):
    """The original ClipCap's schedule (its ``train.py`` uses transformers'
    ``get_linear_schedule_with_warmup``): the learning rate rises linearly from 0 over ``warmup_steps``
    optimizer steps, then falls linearly to 0 at ``total_steps``. Stepped after every optimizer step.

    Args:
        optimizer: the optimizer whose learning rates it scales.
        warmup_steps: steps of the linear rise (5000 in ClipCap).
        total_steps: the step at which the rate reaches 0; None takes the trainer's estimate of the run's
            optimizer steps (``CaptionModule`` sets it: epochs × batches, as ClipCap's ``epochs *
            len(train_dataloader)``).
    """

    interval = "step"

    def __init__(
        self, optimizer: torch.optim.Optimizer, warmup_steps: int = 5000, total_steps: int | None = None
    ):
        if warmup_steps < 0 or (total_steps is not None and total_steps < 1):
            raise ValueError(
                f"WarmupLinearDecay: warmup_steps must be ≥ 0 and total_steps ≥ 1, got {warmup_steps}, {total_steps}"
            )
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        """The multiplier of the base learning rate after ``step`` optimizer steps."""
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        total = self.total_steps if self.total_steps is not None else step + 1
        return max(0.0, (total - step) / max(1, total - self.warmup_steps))
