"""DiscriTune (Dessì et al., CVPR 2023): REINFORCE with a frozen CLIP retriever's reward, as a preset of
:class:`clipcap.objectives.PolicyGradient`.

Each step captions the batch's images (greedy by default, decoded without gradients with the LM in
training mode, dropout on, as EGG's sender does), lets the frozen CLIP score every caption against every
image of the batch, and rewards a caption with the log-probability that CLIP picks its own image
(:class:`clipcap.objectives.RetrievalReward`). The loss is ``(−R − b) · log π`` per caption, ``b`` the
cumulative mean of past batch-mean losses, ``log π`` computed by a teacher-forced pass as EGG computes it:
the caption's token log-probabilities before the EOS (a "." that stopped it included) summed and divided by
``min(n + 1, T)``, T the batch's padded row length. Its loss and gradients are those of the objective
before it became a preset (``tests/test_policy_gradient.py`` holds it to recorded numbers).

Legend for shapes: B images (and captions) in the batch, D CLIP embedding size, T caption tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from clipcap.clip.encoder import ClipEncoder
from clipcap.data.batch import CaptionBatch
from clipcap.generation import DecodingConfig
from clipcap.objectives.advantages import Advantage, CumulativeMeanBaseline
from clipcap.objectives.policy_gradient import GREEDY_ROLLOUT, PolicyGradient
from clipcap.objectives.reward_functions import RetrievalReward


class DiscriTune(PolicyGradient):
    """REINFORCE with a frozen CLIP retriever: captions are rewarded for picking out their image.

    The faithful settings are the defaults, as EGG's ``emergent_captioner`` computes them (docs/fidelity.md
    lists every deviation): greedy rollout decoded with dropout on, 30 caption tokens, stop at EOS or after
    the first token holding ".", the discriminative reward among the in-batch images, the cumulative-mean
    baseline, EGG's normalisation of log π. The receiver
    is the CLIP the data's features come from (``data.init_args.clip_model``), so the batch's cached
    features are its image embeddings, unless ``receiver_clip`` names another CLIP with its own caches.

    Args:
        rollout: how training captions are decoded (greedy, 30 new tokens, stop after "." by default;
            ``do_sample: true`` samples instead). ``max_new_tokens`` counts caption tokens only: EGG's
            ``max_len`` counts the 10 prefix positions too, so its sweeps' ``max_len 40`` is 30 here.
        baseline: the baseline of the loss −R: ``CumulativeMeanBaseline`` (the paper's, default),
            ``MovingAverageBaseline``, ``SelfCriticalBaseline`` (the greedy caption's loss) or
            ``LeaveOneOutBaseline(samples=k)`` (k sampled captions per image) or
            ``GroupNormalisedAdvantage(samples=k)`` (GRPO's); all but the first two need
            ``rollout.do_sample: true``. Any advantage estimator of :mod:`clipcap.objectives.advantages`.
        discriminative: reward ``log softmax`` over the in-batch images (True) or the plain CLIP cosine of
            the caption with its image (False, the paper's appendix comparison).
        receiver_clip: the CLIP that reads the captions; the data's ``clip_model`` when None. When it is
            another CLIP than the features' (e.g. a ViT-L/14 receiver for a captioner fed ViT-B/32
            features, or any CLIP for a BLIP captioner, whose features are BLIP's), its image embeddings
            come from ``receiver_features_dir``.
        receiver_features_dir: feature caches made with ``receiver_clip``, one folder per split as
            ``clipcap features`` writes them (run it with ``--data.init_args.clip_model=<receiver>
            --data.init_args.features_dir=<this folder>``); needed only when the receiver differs from the
            data's CLIP. Caches made with another CLIP or of another dataset are refused.
        global_distractors: under DDP, every caption competes against the images of the whole global
            batch (all ranks' features are gathered) instead of its rank's share; the paper's in-batch
            setting on one device is the same as this on all devices together.
        kl_coefficient: β of the KL reward shaping (0 is off, the paper's default): each caption's reward
            becomes ``R − β · KL``, KL estimated on the caption's own tokens as the mean of
            ``log π(token | prefix) − log p_LM(token)`` with p_LM the frozen LM without the prefix (the
            pretrained LM, reloaded frozen when the captioner's LM is trained), which keeps captions close
            to fluent language. A ``ClipCaptioner`` only: BLIP's decoder has no un-prefixed LM (refused).
        hard_negatives: extra distractors per caption (H), the CLIP nearest neighbours of its image among
            the training split's cached features, on top of the in-batch ones (0 is off, the paper's).
        duplicate_threshold: neighbours at least this cosine-similar to the image are near-duplicates and
            never used as distractors; the image itself and the rest of the batch never are either.
        log_probs_from_rollout: take log π from the rollout itself, decoded with gradients in training mode,
            instead of a second, teacher-forced pass over the captions (the default, and what EGG's sender
            does: it decodes without gradients, then scores the captions teacher-forced). It saves that forward pass, but backward runs through the
            rollout step by step and keeps every step's KV cache, O(L²) in the caption length instead of
            O(L): on CPU a GPT-2-small step was slower at batch 32 and no faster at 100
            (docs/benchmarks.md). The greedy tokens are chosen with dropout on. Without dropout log π and
            its gradient are the teacher-forced ones. A ``ClipCaptioner`` without gradient checkpointing
            only; the rollout is then always in the current mode, whatever ``rollout_dropout`` says.
        log_prob_normalisation: ``egg`` (faithful): log π is the sum of the caption's token
            log-probabilities before the EOS divided by ``min(n + 1, T)``, T the batch's padded row length,
            and a caption that stopped at once has log π = 0; ``mean``: the mean over the caption's n tokens,
            a caption that stopped at once scored on its stop token (clipcap's earlier choice: each caption
            weighted alike whatever the batch's longest, and an empty caption still pushed down or up).
        rollout_dropout: decode the training captions with the LM in training mode, dropout on (True, as
            EGG's sender does: its greedy captions are not the eval-mode ones); False decodes them in eval
            mode. The teacher-forced pass runs in training mode either way.
    """

    def __init__(
        self,
        rollout: DecodingConfig | None = GREEDY_ROLLOUT,
        baseline: Advantage | None = None,
        discriminative: bool = True,
        receiver_clip: str | None = None,
        receiver_features_dir: str | None = None,
        global_distractors: bool = False,
        kl_coefficient: float = 0.0,
        hard_negatives: int = 0,
        duplicate_threshold: float = 0.95,
        log_probs_from_rollout: bool = False,
        log_prob_normalisation: str = "egg",
        rollout_dropout: bool = True,
    ) -> None:
        if log_prob_normalisation not in ("egg", "mean"):
            raise ValueError(
                f"DiscriTune: log_prob_normalisation must be one of ('egg', 'mean'), got {log_prob_normalisation!r}"
            )
        super().__init__(
            rewards=[
                RetrievalReward(
                    discriminative=discriminative,
                    receiver_clip=receiver_clip,
                    receiver_features_dir=receiver_features_dir,
                    global_distractors=global_distractors,
                    hard_negatives=hard_negatives,
                    duplicate_threshold=duplicate_threshold,
                )
            ],
            advantage=baseline if baseline is not None else CumulativeMeanBaseline(),
            rollout=rollout,
            kl_coefficient=kl_coefficient,
            log_prob_normalisation=log_prob_normalisation,
            rollout_dropout=rollout_dropout,
            log_probs_from_rollout=log_probs_from_rollout,
        )
        # Checkpoints written before DiscriTune became a preset keep the baseline under "baseline.".
        self._register_load_state_dict_pre_hook(_baseline_was_advantage)

    @property
    def baseline(self) -> Advantage:
        """The advantage estimator (DiscriTune's argument calls it the baseline)."""
        return self.advantage

    @property
    def retrieval(self) -> RetrievalReward:
        """The retrieval reward and its receiver CLIP."""
        return self.rewards[0]

    @property
    def receiver(self) -> ClipEncoder:
        return self.retrieval.receiver

    def set_receiver(self, encoder: ClipEncoder) -> None:
        """Uses ``encoder`` (a ``ClipEncoder``) as the receiver, e.g. one already loaded."""
        self.retrieval.set_receiver(encoder)

    def receiver_image_features(self, batch: CaptionBatch) -> torch.Tensor:
        """(B, D_receiver) the receiver's embeddings of the batch's images (see ``RetrievalReward``)."""
        return self.retrieval.receiver_image_features(batch)


def _baseline_was_advantage(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Renames ``<prefix>baseline.*`` (DiscriTune before it became a preset) to ``<prefix>advantage.*``."""
    for key in [key for key in state_dict if key.startswith(prefix + "baseline.")]:
        state_dict[prefix + "advantage." + key[len(prefix + "baseline.") :]] = state_dict.pop(key)
