"""Advantage estimators of the policy-gradient objective: what each sampled caption's reward is compared with.

Every estimator turns the rewards R of a step's N = B·K captions (image-major: the K captions of an image
are adjacent) into advantages A; the loss is ``−A · log π`` averaged over the captions. Their state (a
running baseline) lives in buffers, so checkpoints keep it.

- :class:`CumulativeMeanBaseline`: ``A = R − mean of past batch-mean rewards`` (DiscriTune's, EGG's
  ``MeanBaseline``).
- :class:`MovingAverageBaseline`: the same with an exponential moving average.
- :class:`SelfCriticalBaseline`: ``A = R − R(greedy caption of the same image)`` (Rennie et al. 2017).
- :class:`LeaveOneOutBaseline`: ``A = R − mean of the image's other K − 1 rewards`` (RLOO, Kool et al.
  2019; Ahmadian et al. 2024).
- :class:`GroupNormalisedAdvantage`: ``A = (R − mean of the image's K rewards) / (std + ε)``, the std taken
  over the group, the whole batch, or not at all (GRPO, Shao et al. 2024, as TRL computes it).

The baselines keep DiscriTune's convention internally: EGG's baseline tracks the loss ``−R``, and so do the
buffers here, so that checkpoints written before the objective became composable load unchanged; the
advantage ``−(−R − b)`` is then bit for bit the ``(−R − b)`` that DiscriTune's loss multiplied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class AdvantageEstimate:
    """What an estimator returns for one step.

    Attributes:
        advantages: (N,) one per caption, no gradient.
        baseline: (N,) the baseline subtracted from the loss ``−R`` (what DiscriTune logs as ``baseline``),
            or None when the estimator is not a plain subtraction (group normalisation).
    """

    advantages: torch.Tensor
    baseline: torch.Tensor | None = None


class Advantage(nn.Module):
    """An advantage estimator (the base class).

    Attributes:
        needs_groups: the estimator compares the K captions of an image (K ≥ 2 is required).
        needs_greedy: the objective must also decode each image greedily and pass that caption's reward.
        samples: the K this estimator was configured with (``LeaveOneOutBaseline(samples=4)``), or None:
            the objective's ``samples_per_image`` decides.
    """

    needs_groups: bool = False
    needs_greedy: bool = False
    samples: int | None = None

    def forward(
        self, rewards: torch.Tensor, group_size: int, greedy_rewards: torch.Tensor | None = None
    ) -> AdvantageEstimate:
        """The advantages of this step's captions, computed before this step updates any state.

        Args:
            rewards: (N,) float rewards, N = B·K, image-major.
            group_size: K, the captions of each image.
            greedy_rewards: (B,) the reward of each image's greedy caption, when ``needs_greedy``.
        """
        raise NotImplementedError

    def update(self, rewards: torch.Tensor) -> None:
        """Takes this step's rewards (N,) into account for later steps (training steps only)."""


class Baseline(Advantage):
    """An estimator that subtracts a baseline: ``A = R − b``, computed as ``−((−R) − b')`` with ``b'`` the
    baseline of the loss ``−R`` (see the module docstring)."""

    def loss_baseline(
        self, losses: torch.Tensor, group_size: int, reference_losses: torch.Tensor | None
    ) -> torch.Tensor:
        """(N,) the baseline of the losses ``−R``.

        Args:
            losses: (N,) ``−R``.
            group_size: K.
            reference_losses: (N,) the loss of each caption's image's greedy caption, when ``needs_greedy``.
        """
        raise NotImplementedError

    def forward(
        self, rewards: torch.Tensor, group_size: int, greedy_rewards: torch.Tensor | None = None
    ) -> AdvantageEstimate:
        losses = -rewards.detach()
        reference_losses = None
        if self.needs_greedy:
            if greedy_rewards is None:
                raise ValueError(f"{type(self).__name__} needs the greedy captions' rewards")
            reference_losses = (-greedy_rewards.detach()).repeat_interleave(group_size)
        baseline = self.loss_baseline(losses, group_size, reference_losses).detach()
        return AdvantageEstimate(advantages=-(losses - baseline), baseline=baseline)


class CumulativeMeanBaseline(Baseline):
    """The mean of all past batch-mean rewards (DiscriTune's, from EGG's ``MeanBaseline``); 0 at first.

    The buffer ``mean`` holds the mean of past batch-mean losses ``−R``, as EGG's does.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def loss_baseline(
        self, losses: torch.Tensor, group_size: int, reference_losses: torch.Tensor | None
    ) -> torch.Tensor:
        return self.mean.to(losses.dtype).expand_as(losses)

    def update(self, rewards: torch.Tensor) -> None:
        self.count += 1
        self.mean += ((-rewards).detach().double().mean() - self.mean) / self.count


class MovingAverageBaseline(Baseline):
    """An exponential moving average of batch-mean rewards (``decay`` weight on the past); the first batch
    sets it. The buffer ``value`` holds the average of the losses ``−R``.

    Args:
        decay: weight of the previous value, in [0, 1).
    """

    def __init__(self, decay: float = 0.99) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"MovingAverageBaseline: decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("value", torch.zeros((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def loss_baseline(
        self, losses: torch.Tensor, group_size: int, reference_losses: torch.Tensor | None
    ) -> torch.Tensor:
        return self.value.to(losses.dtype).expand_as(losses)

    def update(self, rewards: torch.Tensor) -> None:
        mean = (-rewards).detach().double().mean()
        # The first batch sets the average instead of being shrunk towards 0.
        self.value.copy_(mean if self.count == 0 else self.decay * self.value + (1 - self.decay) * mean)
        self.count += 1


class SelfCriticalBaseline(Baseline):
    """Self-critical sequence training (Rennie et al. 2017): a sampled caption's baseline is the reward of
    the greedy caption of the same image, so only captions that beat greedy decoding are reinforced. Needs
    a sampling rollout (a greedy rollout would have zero advantage everywhere)."""

    needs_greedy = True

    def loss_baseline(
        self, losses: torch.Tensor, group_size: int, reference_losses: torch.Tensor | None
    ) -> torch.Tensor:
        if reference_losses is None:
            raise ValueError("SelfCriticalBaseline needs the greedy captions' rewards")
        return reference_losses.to(losses.dtype)


def _check_samples(owner: str, samples: int | None) -> int | None:
    if samples is not None and samples < 2:
        raise ValueError(
            f"{owner}: samples must be at least 2 (it compares the captions of one image), got {samples}"
        )
    return samples


def _groups(values: torch.Tensor, group_size: int, owner: str) -> torch.Tensor:
    """(B, K) view of image-major values."""
    if group_size < 2 or values.numel() % group_size:
        raise ValueError(
            f"{owner}: needs K ≥ 2 captions per image and N divisible by K, got N={values.numel()}, "
            f"K={group_size} (set model.objective.init_args.samples_per_image)"
        )
    return values.view(-1, group_size)


def _equal_groups(groups: torch.Tensor) -> torch.Tensor:
    """(B, 1) whether all K values of a group are equal."""
    return (groups == groups[:, :1]).all(dim=1, keepdim=True)


class LeaveOneOutBaseline(Baseline):
    """REINFORCE leave-one-out (Kool et al. 2019; RLOO): K captions are sampled per image and each one's
    baseline is the mean reward of the other K − 1 of the same image. Needs a sampling rollout.

    Args:
        samples: K, captions sampled per image (≥ 2); None takes the objective's ``samples_per_image``.
            ``DiscriTune`` reads K from here (``LeaveOneOutBaseline(samples=4)``).
    """

    needs_groups = True

    def __init__(self, samples: int | None = None) -> None:
        super().__init__()
        self.samples = _check_samples("LeaveOneOutBaseline", samples)

    def loss_baseline(
        self, losses: torch.Tensor, group_size: int, reference_losses: torch.Tensor | None
    ) -> torch.Tensor:
        per_image = _groups(losses.detach(), group_size, "LeaveOneOutBaseline")
        others = (per_image.sum(dim=1, keepdim=True) - per_image) / (group_size - 1)
        # A group of equal rewards has exactly zero advantage (the division above may round off it).
        others = torch.where(_equal_groups(per_image), per_image, others)
        return others.reshape(-1)


GROUP_SCALES = ("group", "batch", "none")


class GroupNormalisedAdvantage(Advantage):
    """GRPO's advantage (Shao et al. 2024): each caption's reward minus the mean of its image's K rewards,
    divided by a standard deviation plus ``epsilon`` (TRL's ``(R − mean) / (std + 1e-4)``, std unbiased).

    A group whose rewards are all equal gets a zero advantage (0 / ε), never NaN.

    Args:
        scale: divide by the std of the image's K rewards (``group``, GRPO's), of the whole batch's N
            rewards (``batch``, as TRL's ``scale_rewards="batch"`` and Dr. GRPO's critics propose), or not
            at all (``none``: the group-mean baseline alone).
        epsilon: added to the std.
        samples: K; None takes the objective's ``samples_per_image``.
    """

    needs_groups = True

    def __init__(self, scale: str = "group", epsilon: float = 1e-4, samples: int | None = None) -> None:
        super().__init__()
        if scale not in GROUP_SCALES:
            raise ValueError(f"GroupNormalisedAdvantage: scale must be one of {GROUP_SCALES}, got {scale!r}")
        if not epsilon > 0:
            raise ValueError(f"GroupNormalisedAdvantage: epsilon must be > 0, got {epsilon}")
        self.scale = scale
        self.epsilon = epsilon
        self.samples = _check_samples("GroupNormalisedAdvantage", samples)

    def forward(
        self, rewards: torch.Tensor, group_size: int, greedy_rewards: torch.Tensor | None = None
    ) -> AdvantageEstimate:
        values = rewards.detach().double()
        groups = _groups(values, group_size, "GroupNormalisedAdvantage")
        centred = (groups - groups.mean(dim=1, keepdim=True)).masked_fill(_equal_groups(groups), 0.0)
        if self.scale == "group":
            centred = centred / (groups.std(dim=1, keepdim=True) + self.epsilon)
        elif self.scale == "batch":
            centred = centred / (values.std() + self.epsilon)
        return AdvantageEstimate(advantages=centred.reshape(-1).to(rewards.dtype))
