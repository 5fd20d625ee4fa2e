"""Reward and log-probability maths of the REINFORCE objectives, as plain functions (the advantage
estimators are in :mod:`clipcap.objectives.advantages`, the reward objects in
:mod:`clipcap.objectives.reward_functions`).

Legend for shapes: B captions in the batch, N candidate images (the target and its distractors), D CLIP
embedding size, T caption tokens, V vocabulary.

The CLIP similarity functions compute in float32 even inside a bf16/fp16 autocast region (``bf16-mixed``
training), where a matrix product would otherwise run in half precision whatever its inputs: CLIP's logit
scale (100) turns bf16's rounding of a cosine (~4·10⁻³) into ~0.1 nat of reward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The baselines lived here before the advantage estimators got their own module; configs saved in
# checkpoints may name them by this path.
from clipcap.objectives.advantages import (  # noqa: F401
    CumulativeMeanBaseline,
    LeaveOneOutBaseline,
    MovingAverageBaseline,
    SelfCriticalBaseline,
)


def full_precision(device: torch.device | str) -> torch.autocast:
    """A context in which autocast is off on ``device``'s type: tensors keep their dtypes, so float32 inputs
    compute in float32 inside a mixed-precision step.

    Args:
        device: the device the computation runs on (its type, ``cpu`` or ``cuda``..., picks the autocast).
    """
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


def discriminative_reward(
    text_embeds: torch.Tensor, image_embeds: torch.Tensor, targets: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """DiscriTune's reward: the log-probability that CLIP retrieves each caption's own image.

    ``R_i = log softmax_j(s(c_i, x_j))[target_i]`` with ``s`` = ``logit_scale`` × the cosine of the
    L2-normalised embeddings (Dessì et al. 2023). Computed in float32.

    Args:
        text_embeds: (B, D) CLIP text embeddings of the captions.
        image_embeds: (N, D) CLIP image embeddings of the candidates (targets and distractors).
        targets: (B,) index into ``image_embeds`` of each caption's own image.
        logit_scale: CLIP's learned temperature (100 for openai's models).

    Returns:
        (B,) float32 rewards, ≤ 0.
    """
    with full_precision(text_embeds.device):
        texts = F.normalize(text_embeds.float(), dim=-1)
        scores = logit_scale * texts @ F.normalize(image_embeds.float(), dim=-1).T
        return scores.log_softmax(dim=-1).gather(1, targets[:, None]).squeeze(1)


def cosine_reward(
    text_embeds: torch.Tensor, image_embeds: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """The non-discriminative alternative (the paper's appendix): CLIP cosine of each caption with its image.

    Args:
        text_embeds: (B, D) caption embeddings.
        image_embeds: (N, D) image embeddings.
        targets: (B,) index of each caption's image.

    Returns:
        (B,) float32 cosines in [-1, 1].
    """
    with full_precision(text_embeds.device):
        images = F.normalize(image_embeds.float(), dim=-1)[targets]
        return (F.normalize(text_embeds.float(), dim=-1) * images).sum(-1)


def token_log_probs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) float32 log-probability of each token: ``logits[:, t]`` (B, T, V) predicts ``token_ids[:, t]``."""
    return logits.float().log_softmax(-1).gather(2, token_ids[:, :, None]).squeeze(2)


def mean_over_tokens(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B,) the mean of each row's first ``counts[b]`` values of (B, T) ``values``; a row with none is
    given its first value (a caption that stopped at once is scored on its stop token)."""
    positions = torch.arange(values.shape[1], device=values.device)[None, :]
    counted = torch.where((counts == 0)[:, None], positions == 0, positions < counts[:, None])
    return (values * counted).sum(1) / counted.sum(1).clamp(min=1)


def caption_log_probs(logits: torch.Tensor, token_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean token log-probability of each caption, the stop excluded (``DiscriTune(log_prob_normalisation=
    "mean")``; EGG's own normalisation is :func:`egg_caption_log_probs`).

    Args:
        logits: (B, T, V) next-token logits; ``logits[:, t]`` predicts ``token_ids[:, t]``.
        token_ids: (B, T) the caption tokens, the stop token at position ``lengths[b]`` where present.
        lengths: (B,) caption tokens before the stop (0 for a caption that stopped at once).

    Returns:
        (B,) mean token log-probability over the first ``lengths[b]`` tokens. A caption with no token
        before its stop gets its stop token's log-probability instead, so that it still has a gradient.
    """
    return mean_over_tokens(token_log_probs(logits, token_ids), lengths)


def egg_row_lengths(lengths: torch.Tensor, stopped: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """How long each caption's row of generated ids is in EGG's sender, whose ``generate`` writes an EOS
    after the caption whenever there is room (its logits processor forces one after a "." token).

    Args:
        lengths: (B,) caption tokens before the stop (a "." that stopped the caption included, EOS not).
        stopped: (B,) the caption ended at a stop rather than at the length cap.
        max_new_tokens: the rollout's length cap in caption tokens.

    Returns:
        (B,) ``min(n + 1, max_new_tokens)`` for a stopped caption, ``n`` for one cut by the cap.
    """
    return torch.where(stopped, (lengths + 1).clamp(max=max_new_tokens), lengths)


def egg_caption_log_probs(
    logits: torch.Tensor, token_ids: torch.Tensor, lengths: torch.Tensor, row_lengths: torch.Tensor
) -> torch.Tensor:
    """log π as EGG's ``ClipCapModel.forward`` computes it (DiscriTune's own code, faithful mode).

    The log-probabilities of the ``n`` tokens before the first EOS are summed and divided by
    ``min(n + 1, T)``, ``T`` the batch's padded row length (the longest row of generated ids, its EOS
    included; see :func:`egg_row_lengths`). A caption that stopped at once (``n = 0``) has log π = 0 and no
    gradient, as there.

    Args:
        logits: (B, T', V) next-token logits; ``logits[:, t]`` predicts ``token_ids[:, t]``.
        token_ids: (B, T') the caption tokens.
        lengths: (B,) caption tokens before the stop (``n``).
        row_lengths: (B,) each caption's generated row length (``n + 1`` with an EOS, else ``n``).

    Returns:
        (B,) float32 log π.
    """
    return egg_normalised(token_log_probs(logits, token_ids), lengths, row_lengths)


def egg_normalised(values: torch.Tensor, lengths: torch.Tensor, row_lengths: torch.Tensor) -> torch.Tensor:
    """EGG's normalisation of (B, T) token log-probabilities (see :func:`egg_caption_log_probs`): the first
    ``lengths[b]`` summed and divided by ``min(n + 1, T)``, T the longest of ``row_lengths``."""
    positions = torch.arange(values.shape[1], device=values.device)[None, :]
    total = (values * (positions < lengths[:, None])).sum(1)
    padded_length = row_lengths.max().clamp(min=1)
    return total / torch.minimum(lengths + 1, padded_length)


def reinforce_loss(rewards: torch.Tensor, baseline: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Per-sample REINFORCE loss ``(−R − b) · log π`` as DiscriTune writes it, b the baseline of −R.

    Minimising it raises ``log π`` where the reward beats the baseline (−R < b) and lowers it elsewhere.

    Args:
        rewards: (B,) rewards (no gradient).
        baseline: scalar or (B,) baseline of the loss −R (no gradient).
        log_probs: (B,) log π of each caption (with gradient).

    Returns:
        (B,) losses; their mean is what is optimised.
    """
    return (-rewards.detach() - baseline.detach()) * log_probs


def hard_negative_indices(
    queries: torch.Tensor,
    bank: torch.Tensor,
    exclude: torch.Tensor,
    count: int,
    duplicate_threshold: float = 0.95,
) -> torch.Tensor:
    """CLIP nearest neighbours of each query image in a bank of image features, as hard distractors.

    Args:
        queries: (B, D) image embeddings of the batch.
        bank: (N, D) image embeddings to draw distractors from (e.g. the training split's cache).
        exclude: (B, E) bank rows each query must never get (its own image, the rest of the batch); -1
            pads.
        count: distractors per query (H).
        duplicate_threshold: bank images at least this cosine-similar to the query are near-duplicates
            (the same photo re-encoded, a crop) and are skipped: they would punish a correct caption.

    Returns:
        (B, H) bank rows, most similar first.

    Raises:
        ValueError: fewer than ``count`` usable bank images for some query.
    """
    with full_precision(queries.device):  # bf16 similarities would reorder close neighbours
        similarity = F.normalize(queries.float(), dim=-1) @ F.normalize(bank.float(), dim=-1).T
    similarity = similarity.masked_fill(similarity >= duplicate_threshold, float("-inf"))
    rows = torch.arange(queries.shape[0], device=queries.device)[:, None].expand_as(exclude)
    valid = exclude >= 0
    similarity[rows[valid], exclude[valid]] = float("-inf")
    values, indices = similarity.topk(count, dim=1)
    if not torch.isfinite(values).all():
        raise ValueError(
            f"hard negatives: fewer than {count} bank images below the duplicate threshold "
            f"{duplicate_threshold} for some image of the batch"
        )
    return indices


def discriminative_reward_with_negatives(
    text_embeds: torch.Tensor,
    image_embeds: torch.Tensor,
    targets: torch.Tensor,
    negative_embeds: torch.Tensor,
    logit_scale: float,
) -> torch.Tensor:
    """:func:`discriminative_reward` where each caption also competes against its own hard negatives.

    Args:
        text_embeds: (B, D) caption embeddings.
        image_embeds: (N, D) shared candidates (the batch's images).
        targets: (B,) each caption's own image among ``image_embeds``.
        negative_embeds: (B, H, D) each caption's extra distractors.
        logit_scale: CLIP's temperature.

    Returns:
        (B,) float32 ``log softmax`` of the own image over the N shared and H own candidates.
    """
    with full_precision(text_embeds.device):
        texts = F.normalize(text_embeds.float(), dim=-1)
        shared = logit_scale * texts @ F.normalize(image_embeds.float(), dim=-1).T
        own = logit_scale * torch.einsum("bd,bhd->bh", texts, F.normalize(negative_embeds.float(), dim=-1))
        return torch.cat([shared, own], dim=1).log_softmax(dim=-1).gather(1, targets[:, None]).squeeze(1)
