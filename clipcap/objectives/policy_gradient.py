"""Policy-gradient finetuning of a prefix captioner, as one objective whose parts are objects.

A step: (1) the rollout decodes K captions per image without gradients (greedy or sampled, the prefix's KV
cache shared by an image's K samples), plus each image's greedy caption when the advantage is
self-critical; (2) the rewards score them, ``R = Σ weight_i · R_i``, optionally shaped by ``− β · KL`` to
the frozen LM; (3) the advantage estimator turns R into advantages A; (4) one teacher-forced pass gives
log π of the same captions with gradient, and the loss is ``mean(−A · log π)`` (plus ``β · KL`` when the KL
is a loss term).

Presets: :class:`clipcap.objectives.DiscriTune` (retrieval reward, cumulative-mean baseline, greedy rollout:
the paper's, with the same loss and gradients as before this layer existed) and :class:`SCST` (CIDEr-D
reward, greedy baseline, 5 samples per image). docs/objectives.md maps each part to its paper.

Legend for shapes: B images in the batch, K captions per image, N = B·K, T caption tokens, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from clipcap.captioner import Captioner, CaptionTokens, ClipCaptioner
from clipcap.clip.encoder import ClipEncoder
from clipcap.data.batch import CaptionBatch
from clipcap.generation import DecodingConfig
from clipcap.objectives.advantages import (
    Advantage,
    CumulativeMeanBaseline,
    SelfCriticalBaseline,
)
from clipcap.objectives.base import Objective, ObjectiveOutput, TrainingData
from clipcap.objectives.reference import check_reference_lm, reference_lm, start_token_id
from clipcap.objectives.reward_functions import CiderReward, Reward, RolloutCaptions
from clipcap.objectives.rewards import (
    egg_normalised,
    egg_row_lengths,
    full_precision,
    mean_over_tokens,
    token_log_probs,
)

LOG_PROB_NORMALISATIONS = ("egg", "mean", "token")
GREEDY_ROLLOUT = DecodingConfig(max_new_tokens=30, stop_at_period=True)
"""The default rollout (DiscriTune's). Defaults are written in the signatures and copied, so that an option
given on the command line (``rollout.max_new_tokens=20``) changes that field and keeps the others."""
KL_MODES = ("reward", "loss")


class PolicyGradient(Objective):
    """REINFORCE-style finetuning with composable rewards, advantage estimator and KL term.

    Args:
        rewards: the rewards, summed with their weights (one or more; see
            :mod:`clipcap.objectives.reward_functions`).
        advantage: the advantage estimator (:mod:`clipcap.objectives.advantages`):
            ``CumulativeMeanBaseline`` (default), ``MovingAverageBaseline``, ``SelfCriticalBaseline``,
            ``LeaveOneOutBaseline``, ``GroupNormalisedAdvantage``.
        rollout: how training captions are decoded (default: greedy, 30 new tokens, stop after ".";
            ``do_sample: true`` with ``temperature``, ``top_k``, ``top_p`` samples). ``max_new_tokens``
            counts caption tokens only.
        samples_per_image: K captions decoded per image (the prefix computed once, its KV cache shared by
            the K); None takes the advantage's ``samples`` or 1. Group advantages need K ≥ 2, and K > 1
            needs a sampling rollout.
        kl_coefficient: β of the KL to the frozen, un-prefixed LM (0 is off). KL is estimated on each
            caption's own tokens: with ``kl_mode="reward"`` each reward becomes ``R − β · KL``, KL the
            mean (under ``log_prob_normalisation``) of ``log π(token) − log p_LM(token)`` (DiscriTune's
            option); with ``"loss"`` the loss gains ``β · mean KL``, each caption's KL the mean over its
            tokens of GRPO's estimator ``exp(log p_LM − log π) − (log p_LM − log π) − 1``, with gradient.
            A ``ClipCaptioner`` only (BLIP's decoder has no un-prefixed LM).
        kl_mode: ``reward`` (shaping) or ``loss`` (a term of the loss).
        log_prob_normalisation: how a caption's token log-probabilities make log π: ``egg`` (DiscriTune's,
            as EGG computes it: the sum over the tokens before the stop divided by ``min(n + 1, T)``, T the
            batch's padded row length); ``mean`` (the mean over its n tokens, a caption that stopped at once
            scored on its stop token); ``token`` (self-critical code's: every token, the EOS that ended a
            caption included, weighs the same across the batch: the loss is ``Σ −A_i · Σ_t log π_it``
            divided by the batch's token count).
        rollout_dropout: decode the training captions with the LM in training mode, dropout on (True, as
            EGG's sender and self-critical code sample); False decodes them in eval mode. Greedy reference
            captions are always decoded in eval mode; the teacher-forced pass runs in training mode.
        log_probs_from_rollout: take log π from the rollout itself, decoded with gradients, instead of the
            teacher-forced pass (``ClipCaptioner`` without gradient checkpointing; see ``DiscriTune``).

    Raises:
        ValueError: no reward, a group advantage with K = 1, K > 1 or a self-critical baseline without a
            sampling rollout, or an option out of range: before any model loads when built from a config.
    """

    needs_captions = False

    def __init__(
        self,
        rewards: list[Reward],
        advantage: Advantage | None = None,
        rollout: DecodingConfig | None = GREEDY_ROLLOUT,
        samples_per_image: int | None = None,
        kl_coefficient: float = 0.0,
        kl_mode: str = "reward",
        log_prob_normalisation: str = "egg",
        rollout_dropout: bool = True,
        log_probs_from_rollout: bool = False,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        rewards = [rewards] if isinstance(rewards, Reward) else list(rewards or [])
        if not rewards:
            raise ValueError(f"{owner}: model.objective.init_args.rewards is empty: give at least one reward")
        names = [reward.name for reward in rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"{owner}: the rewards' names must differ (they name the logs), got {names}")
        self.rewards = torch.nn.ModuleList(rewards)
        self.advantage = advantage if advantage is not None else CumulativeMeanBaseline()
        self.rollout = replace(rollout or GREEDY_ROLLOUT)
        if self.rollout.num_return_sequences != 1:
            raise ValueError(
                f"{owner}: rollout.num_return_sequences must be 1; several captions per image are "
                "model.objective.init_args.samples_per_image"
            )
        configured = self.advantage.samples
        if samples_per_image is None:
            samples_per_image = configured or 1
        elif configured is not None and configured != samples_per_image:
            raise ValueError(
                f"{owner}: samples_per_image={samples_per_image} but {type(self.advantage).__name__} was "
                f"given samples={configured}; set one of them"
            )
        if samples_per_image < 1:
            raise ValueError(f"{owner}: samples_per_image must be ≥ 1, got {samples_per_image}")
        if self.advantage.needs_groups and samples_per_image < 2:
            raise ValueError(
                f"{owner}: {type(self.advantage).__name__} compares the captions of one image, so it needs "
                f"model.objective.init_args.samples_per_image ≥ 2, got {samples_per_image}"
            )
        if (samples_per_image > 1 or self.advantage.needs_greedy) and not self.rollout.do_sample:
            raise ValueError(
                f"{owner}: {type(self.advantage).__name__} with {samples_per_image} caption(s) per image needs "
                "a sampling rollout (model.objective.init_args.rollout.do_sample=true)"
            )
        self.samples_per_image = samples_per_image
        if not (math.isfinite(kl_coefficient) and kl_coefficient >= 0):
            raise ValueError(f"{owner}: kl_coefficient must be a finite number ≥ 0, got {kl_coefficient}")
        if kl_mode not in KL_MODES:
            raise ValueError(f"{owner}: kl_mode must be one of {KL_MODES}, got {kl_mode!r}")
        self.kl_coefficient = kl_coefficient
        self.kl_mode = kl_mode
        if log_prob_normalisation not in LOG_PROB_NORMALISATIONS:
            raise ValueError(
                f"{owner}: log_prob_normalisation must be one of {LOG_PROB_NORMALISATIONS}, got "
                f"{log_prob_normalisation!r}"
            )
        if log_probs_from_rollout and kl_mode == "loss" and kl_coefficient > 0:
            raise ValueError(
                f"{owner}: kl_mode=loss compares token by token with the teacher-forced captions; drop "
                "log_probs_from_rollout or use kl_mode=reward"
            )
        if log_probs_from_rollout and log_prob_normalisation == "token":
            raise ValueError(
                f"{owner}: log_probs_from_rollout does not score the EOS that the token normalisation counts"
            )
        self.log_prob_normalisation = log_prob_normalisation
        self.rollout_dropout = rollout_dropout
        self.log_probs_from_rollout = log_probs_from_rollout

    @property
    def needs_references(self) -> bool:
        """Whether a reward reads the images' reference captions (the data must be labelled)."""
        return any(reward.needs_references for reward in self.rewards)

    def setup(self, data: TrainingData) -> None:
        encoders: dict[str, ClipEncoder] = {}
        for reward in self.rewards:
            reward.setup(data, encoders)

    # ------------------------------------------------------------------------------------------ a step

    def forward(self, captioner: Captioner, batch: CaptionBatch) -> ObjectiveOutput:
        owner = type(self).__name__
        if self.kl_coefficient > 0:  # before the rollout: a BLIP captioner has no un-prefixed LM
            check_reference_lm(captioner, f"{owner}: kl_coefficient > 0")
        features = batch.clip_features

        # 1. Rollout, cut after the stop; EOS dropped, a "." kept as caption text. The N = B·K captions are
        # image-major. No gradient, unless log π comes from the rollout itself.
        k = self.samples_per_image
        rollout = self.rollout if k == 1 else replace(self.rollout, num_return_sequences=k)
        if self.log_probs_from_rollout:
            if not isinstance(captioner, ClipCaptioner):
                raise ValueError(
                    f"{owner}: log_probs_from_rollout needs a ClipCaptioner (a prefix LM decoded by "
                    f"generate), got {type(captioner).__name__}; drop it to score captions with a "
                    "teacher-forced pass"
                )
            caption_ids, rollout_ids, rollout_logits = captioner.rollout_with_logits(features, rollout)
        else:
            caption_ids = captioner.generate_ids(features, rollout, keep_mode=self.rollout_dropout)
        texts = self._texts(captioner, caption_ids)
        owners = torch.arange(features.shape[0], device=features.device).repeat_interleave(k)
        sampled = RolloutCaptions(texts, owners, batch)
        greedy = None
        if self.advantage.needs_greedy:
            with torch.no_grad():
                greedy_ids = captioner.generate_ids(features, replace(self.rollout, do_sample=False))
            greedy = RolloutCaptions(self._texts(captioner, greedy_ids), owners[::k], batch)

        # 2. Rewards, in float32 whatever autocast the step runs under (CLIP's logit scale of 100 turns bf16
        # rounding into ~0.1 nat of reward).
        with torch.no_grad(), full_precision(features.device):
            rewards, terms = self._rewards(sampled)
            greedy_rewards = self._rewards(greedy)[0] if greedy is not None else None

        # 3. log π of the same captions, with gradient: one teacher-forced pass, or the rollout's own logits
        # (position t of both predicts caption token t).
        stopped = self._stopped(captioner, caption_ids, rollout)
        # The token normalisation also scores the EOS that ended a caption (dropped from caption_ids).
        with_stop = (
            self._ended_by_eos(captioner, caption_ids, rollout)
            if self.log_prob_normalisation == "token"
            else None
        )
        tokens, lengths = self._caption_tokens(captioner, caption_ids, with_stop)
        if self.log_probs_from_rollout:
            logits, token_ids = rollout_logits, rollout_ids
        else:
            logits = captioner(features.repeat_interleave(k, dim=0) if k > 1 else features, tokens).logits
            token_ids = tokens.input_ids
        policy_tokens = token_log_probs(logits, token_ids)
        log_probs = self._normalise(policy_tokens, lengths, stopped, with_stop, rollout.max_new_tokens)
        kl_loss = None
        if self.kl_coefficient > 0:
            reference_tokens = self._unprefixed_token_log_probs(captioner, tokens)
            if self.kl_mode == "reward":
                reference = self._normalise(
                    reference_tokens, lengths, stopped, with_stop, rollout.max_new_tokens
                )
                kl = log_probs.detach() - reference
                rewards = rewards - self.kl_coefficient * kl
                terms["kl"] = kl.mean()
            else:
                kl_loss = self._k3_kl(policy_tokens, reference_tokens, lengths, with_stop)
                terms["kl"] = kl_loss.detach()

        if not (torch.isfinite(rewards).all() and torch.isfinite(log_probs).all()):
            zero = log_probs.sum() * 0.0 if torch.isfinite(log_probs).all() else features.new_zeros(())
            reason = f"{owner}: non-finite reward or log-probability"
            return ObjectiveOutput(loss=zero, terms={}, skip=True, skip_reason=reason)

        # 4. Advantages (computed before this step updates the estimator's state) and the loss.
        estimate = self.advantage(rewards, k, greedy_rewards)
        loss = (-estimate.advantages.detach() * log_probs).mean()
        if kl_loss is not None:
            loss = loss + self.kl_coefficient * kl_loss
        if self.training:
            self.advantage.update(rewards)
        if estimate.baseline is not None:
            terms["baseline"] = estimate.baseline.mean()
        else:
            terms["advantage_abs"] = estimate.advantages.abs().mean()
        if greedy_rewards is not None:
            terms["greedy_reward"] = greedy_rewards.mean()
        return ObjectiveOutput(
            loss=loss,
            terms={
                **terms,
                "reward": rewards.mean(),
                "log_prob": log_probs.detach().mean(),
                "caption_tokens": lengths.float().mean(),
                "captions": torch.tensor(float(len(texts))),
            },
        )

    def _rewards(self, captions: RolloutCaptions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(N,) the weighted sum of the rewards, and their terms (each part logged when it is not the sum)."""
        total = None
        terms: dict[str, torch.Tensor] = {}
        parts = len(self.rewards) > 1 or any(reward.weight != 1.0 for reward in self.rewards)
        for reward in self.rewards:
            output = reward(captions)
            values = output.values.float()
            if values.shape != (len(captions.texts),):
                raise RuntimeError(
                    f"{type(reward).__name__} returned rewards of shape {tuple(values.shape)} for "
                    f"{len(captions.texts)} captions"
                )
            weighted = reward.weight * values  # exact for a weight of 1
            total = weighted if total is None else total + weighted
            terms.update(output.terms)
            if parts:
                terms[f"reward/{reward.name}"] = values.mean()
        return total, terms

    # ---------------------------------------------------------------------------------- log π and KL

    def _normalise(
        self,
        token_values: torch.Tensor,
        lengths: torch.Tensor,
        stopped: torch.Tensor,
        with_stop: torch.Tensor | None,
        max_new_tokens: int,
    ) -> torch.Tensor:
        """(N,) a caption's log π (or log p_LM) from its (N, T) token log-probabilities."""
        if self.log_prob_normalisation == "mean":
            return mean_over_tokens(token_values, lengths)
        if self.log_prob_normalisation == "token":
            counts = lengths + with_stop.long()
            positions = torch.arange(token_values.shape[1], device=token_values.device)[None, :]
            total = (token_values * (positions < counts[:, None])).sum(1)
            return total * (len(counts) / counts.sum().clamp(min=1))
        # EGG's: a caption that stopped at once has log π = 0 and no gradient.
        return egg_normalised(token_values, lengths, egg_row_lengths(lengths, stopped, max_new_tokens))

    @staticmethod
    def _k3_kl(
        policy: torch.Tensor,
        reference: torch.Tensor,
        lengths: torch.Tensor,
        with_stop: torch.Tensor | None,
    ) -> torch.Tensor:
        """The mean over captions of GRPO's per-token KL estimator, averaged over each caption's tokens."""
        counts = lengths + (with_stop.long() if with_stop is not None else 0)
        difference = reference - policy
        return mean_over_tokens(torch.exp(difference) - difference - 1, counts).mean()

    def _unprefixed_token_log_probs(self, captioner: Captioner, tokens: CaptionTokens) -> torch.Tensor:
        """(N, T) log p_LM of each caption token under the frozen LM, given only a start token instead of
        the image prefix. No gradient."""
        with torch.no_grad():
            reference = reference_lm(self, captioner)
            start = start_token_id(reference)
            rows = tokens.input_ids.shape[0]
            input_ids = torch.cat(
                [tokens.input_ids.new_full((rows, 1), start), tokens.input_ids[:, :-1]], dim=1
            )
            attention_mask = torch.cat(
                [tokens.attention_mask.new_ones((rows, 1)), tokens.attention_mask[:, :-1]], 1
            )
            embeds = reference.embed(input_ids).to(reference.dtype)
            return token_log_probs(reference(embeds, attention_mask), tokens.input_ids)

    # ---------------------------------------------------------------------------------- caption rows

    @staticmethod
    def _stopped(captioner: Captioner, caption_ids: list[list[int]], rollout: DecodingConfig) -> torch.Tensor:
        """(N,) whether each caption ended at a stop (EOS, or a "." token kept as its last token) rather
        than at the length cap: only then does EGG's generate write an EOS after it."""
        stops = set(captioner.stop_ids(rollout))
        return torch.tensor(
            [len(ids) < rollout.max_new_tokens or (bool(ids) and ids[-1] in stops) for ids in caption_ids],
            device=captioner.device,
        )

    @staticmethod
    def _ended_by_eos(
        captioner: Captioner, caption_ids: list[list[int]], rollout: DecodingConfig
    ) -> torch.Tensor:
        """(N,) whether a caption ended because the EOS was chosen (dropped from ``caption_ids``), not at a
        kept "." stop or at the length cap."""
        stops = set(captioner.stop_ids(rollout))
        return torch.tensor(
            [len(ids) < rollout.max_new_tokens and not (ids and ids[-1] in stops) for ids in caption_ids],
            device=captioner.device,
        )

    @staticmethod
    def _texts(captioner: Captioner, caption_ids: list[list[int]]) -> list[str]:
        return [
            text.strip() for text in captioner.tokenizer.batch_decode(caption_ids, skip_special_tokens=True)
        ]

    @staticmethod
    def _caption_tokens(
        captioner: Captioner, caption_ids: list[list[int]], with_stop: torch.Tensor | None = None
    ) -> tuple[CaptionTokens, torch.Tensor]:
        """The rollout's captions as teacher-forcing input, and their lengths (tokens before the stop).

        A caption that stopped at once is given its EOS as its only token (length 0), so that its
        log-probability, and the gradient pushing it up or down, still exist. With ``with_stop``, the
        captions it marks get their EOS appended (the token normalisation scores the choice to stop).
        """
        eos = captioner.lm.eos_token_id
        marks = with_stop.tolist() if with_stop is not None else [False] * len(caption_ids)
        rows = [
            ids + [eos] if mark else (ids if ids else [eos])
            for ids, mark in zip(caption_ids, marks, strict=True)
        ]
        lengths = torch.tensor([len(ids) for ids in caption_ids], dtype=torch.long, device=captioner.device)
        return CaptionTokens.from_rows(rows, captioner.lm.pad_token_id, captioner.device), lengths


SCST_ROLLOUT = DecodingConfig(do_sample=True, max_new_tokens=30, stop_at_period=True)
"""SCST's default rollout (see ``GREEDY_ROLLOUT``)."""


class SCST(PolicyGradient):
    """Self-critical sequence training (Rennie et al. 2017) as self-critical code runs it for captioning
    (Luo's self-critical.pytorch, "SCST with 5 samples"): 5 sampled captions per image, decoded with
    dropout on, rewarded with CIDEr-D against the image's references, each compared with the reward of the
    image's greedy caption (decoded in eval mode); the loss averages ``−A · log π`` over every token the
    captions chose, the ending EOS included.

    Every argument is :class:`PolicyGradient`'s; only the defaults differ: ``rewards=[CiderReward()]``,
    ``advantage=SelfCriticalBaseline()``, a sampled rollout (temperature 1, 30 tokens, stop after "."),
    ``samples_per_image=5``, ``log_prob_normalisation="token"``. Training images need their references
    (CIDEr-D), so the data must not be ``unlabelled``.
    """

    def __init__(
        self,
        rewards: list[Reward] | None = None,
        advantage: Advantage | None = None,
        rollout: DecodingConfig | None = SCST_ROLLOUT,
        samples_per_image: int | None = 5,
        kl_coefficient: float = 0.0,
        kl_mode: str = "reward",
        log_prob_normalisation: str = "token",
        rollout_dropout: bool = True,
        log_probs_from_rollout: bool = False,
    ) -> None:
        super().__init__(
            rewards=rewards if rewards is not None else [CiderReward()],
            advantage=advantage if advantage is not None else SelfCriticalBaseline(),
            rollout=rollout or SCST_ROLLOUT,
            samples_per_image=samples_per_image,
            kl_coefficient=kl_coefficient,
            kl_mode=kl_mode,
            log_prob_normalisation=log_prob_normalisation,
            rollout_dropout=rollout_dropout,
            log_probs_from_rollout=log_probs_from_rollout,
        )
