"""DiscriTune (Dessì et al., CVPR 2023): REINFORCE with a frozen CLIP retriever's reward.

Each step captions the batch's images (greedy by default, decoded without gradients with the LM in
training mode, dropout on, as EGG's sender does), lets the frozen CLIP score every caption against every
image of the batch, and rewards a caption with the log-probability that CLIP picks its own image. The loss is
``(−R − b) · log π(c)`` per caption, ``b`` the cumulative mean of past batch-mean losses, ``log π`` computed
by a teacher-forced pass as EGG computes it: the caption's token log-probabilities before the EOS (a "."
that stopped it included) summed and divided by ``min(n + 1, T)``, T the batch's padded row length.

Legend for shapes: B images (and captions) in the batch, D CLIP embedding size, T caption tokens.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from clipcap.captioner import Captioner, CaptionTokens, ClipCaptioner
from clipcap.clip.encoder import ClipEncoder
from clipcap.data.batch import CaptionBatch
from clipcap.features.cache import FeatureCache, cache_expectation
from clipcap.frozen import keep_unregistered
from clipcap.generation import DecodingConfig
from clipcap.objectives.base import Objective, ObjectiveOutput, TrainingData
from clipcap.objectives.reference import check_reference_lm, reference_lm, start_token_id
from clipcap.objectives.rewards import (
    Baseline,
    CumulativeMeanBaseline,
    caption_log_probs,
    cosine_reward,
    discriminative_reward,
    discriminative_reward_with_negatives,
    egg_caption_log_probs,
    egg_row_lengths,
    full_precision,
    hard_negative_indices,
    reinforce_loss,
)

LOG_PROB_NORMALISATIONS = ("egg", "mean")


class DiscriTune(Objective):
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
            ``LeaveOneOutBaseline(samples=k)`` (k sampled captions per image); the last two need
            ``rollout.do_sample: true``.
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

    needs_captions = False

    def __init__(
        self,
        rollout: DecodingConfig | None = None,
        baseline: Baseline | None = None,
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
        super().__init__()
        self.rollout = rollout or DecodingConfig(max_new_tokens=30, stop_at_period=True)
        if log_prob_normalisation not in LOG_PROB_NORMALISATIONS:
            raise ValueError(
                f"DiscriTune: log_prob_normalisation must be one of {LOG_PROB_NORMALISATIONS}, got "
                f"{log_prob_normalisation!r}"
            )
        self.log_prob_normalisation = log_prob_normalisation
        self.rollout_dropout = rollout_dropout
        if self.rollout.num_return_sequences != 1:
            raise ValueError(
                "DiscriTune: rollout.num_return_sequences must be 1; several captions per image come from "
                "the baseline (LeaveOneOutBaseline(samples=k))"
            )
        self.baseline = baseline if baseline is not None else CumulativeMeanBaseline()
        if (self.baseline.samples_per_image > 1 or self.baseline.needs_greedy_reference) and not (
            self.rollout.do_sample
        ):
            raise ValueError(
                f"DiscriTune: {type(self.baseline).__name__} needs a sampling rollout "
                "(model.objective.init_args.rollout.do_sample=true)"
            )
        self.discriminative = discriminative
        self.receiver_clip = receiver_clip
        self.receiver_features_dir = receiver_features_dir
        self.global_distractors = global_distractors
        if kl_coefficient < 0:
            raise ValueError(f"DiscriTune: kl_coefficient must be ≥ 0, got {kl_coefficient}")
        self.kl_coefficient = kl_coefficient
        if hard_negatives < 0 or (hard_negatives and not discriminative):
            raise ValueError(
                "DiscriTune: hard_negatives must be ≥ 0 and needs the discriminative reward, got "
                f"hard_negatives={hard_negatives}, discriminative={discriminative}"
            )
        self.hard_negatives = hard_negatives
        self.duplicate_threshold = duplicate_threshold
        self.log_probs_from_rollout = log_probs_from_rollout
        # Frozen and large, or data: outside the module tree (no checkpoint copy, no optimizer).
        for name in ("_receiver", "_receiver_caches", "_bank", "_bank_cache"):
            keep_unregistered(self, name, None)

    # The receiver is frozen and large: it is kept out of the module tree so that checkpoints do not carry
    # a copy of it and optimizers never see it.
    @property
    def receiver(self):
        receiver = self._receiver
        if receiver is None:
            raise RuntimeError(
                "DiscriTune has no receiver CLIP yet: it is loaded in setup() from receiver_clip or the "
                "data's clip_model (set data.init_args.clip_model or model.objective.init_args.receiver_clip)"
            )
        return receiver

    def set_receiver(self, encoder) -> None:
        """Uses ``encoder`` (a ``ClipEncoder``) as the receiver, e.g. one already loaded."""
        keep_unregistered(self, "_receiver", encoder)

    def setup(self, data: TrainingData) -> None:
        data_clip = data.clip_model
        name = self.receiver_clip or data_clip
        if name is None and self._receiver is None:
            raise ValueError(
                "DiscriTune needs the receiver CLIP: set data.init_args.clip_model (the CLIP of the cached "
                "features) or model.objective.init_args.receiver_clip"
            )
        if self.receiver_features_dir is not None and (self.receiver_clip in (None, data_clip)):
            raise ValueError(
                "DiscriTune: receiver_features_dir is set but the receiver is the data's CLIP "
                f"({name!r}), whose features the batch already carries; set receiver_clip to the CLIP "
                "those caches were made with, or drop receiver_features_dir"
            )
        own_features = self.receiver_features_dir is not None or (
            self.receiver_clip is not None and data_clip is not None and self.receiver_clip != data_clip
        )
        if own_features and self._receiver_caches is None:
            self._open_receiver_caches(data, name)
        if self.hard_negatives and self._bank is None:
            if data.train_features is None:
                raise ValueError("DiscriTune: hard_negatives needs the training split's cached features")
            caches = self._receiver_caches
            # Distractors live in the receiver's space: its own training cache when it has one.
            cache = caches["train"] if caches else data.train_features()
            # The bank stays outside the module tree: it is data, not state, and may be large.
            keep_unregistered(self, "_bank", torch.from_numpy(np.asarray(cache.features, dtype=np.float32)))
            keep_unregistered(self, "_bank_cache", cache)
        if self._receiver is None:
            self.set_receiver(ClipEncoder(name))

    def _open_receiver_caches(self, data: TrainingData, name: str) -> None:
        """Opens the receiver's own feature caches (every split there is), checked against its CLIP."""
        if self.receiver_features_dir is None:
            raise ValueError(
                f"DiscriTune: receiver_clip={name!r} is not the CLIP of the data's features "
                f"({data.clip_model!r}), so the receiver needs its own image "
                "features: extract them with `clipcap features --config <config> "
                f"--data.init_args.clip_model={name} --data.init_args.features_dir=<folder>` and set "
                "model.objective.init_args.receiver_features_dir=<folder>"
            )
        receiver = ClipEncoder(name)
        self.set_receiver(receiver)
        folder = Path(self.receiver_features_dir).expanduser()
        dataset = data.dataset
        caches = {}
        for split in (
            sorted(p.name for p in folder.iterdir() if FeatureCache.exists(p)) if folder.is_dir() else []
        ):
            caches[split] = FeatureCache.open(
                folder / split, expect=cache_expectation(receiver, dataset=dataset, split=split)
            )
        if "train" not in caches:
            raise ValueError(
                f"DiscriTune: receiver_features_dir={folder} holds no training-split feature cache made "
                f"with {name!r} (found {sorted(caches) or 'none'})"
            )
        keep_unregistered(self, "_receiver_caches", caches)

    def receiver_image_features(self, batch: CaptionBatch) -> torch.Tensor:
        """(B, D_receiver) the receiver's embeddings of the batch's images: the batch's own features when
        the receiver is the data's CLIP, else rows of the receiver's caches, looked up by image id."""
        caches = self._receiver_caches
        if not caches:
            return batch.clip_features
        rows = []
        for image_id in batch.image_ids:
            cache = next((c for c in caches.values() if image_id in c), None)
            if cache is None:
                raise KeyError(
                    f"DiscriTune: image {image_id!r} has no features in the receiver's caches under "
                    f"{self.receiver_features_dir} (splits {sorted(caches)}); extract them with the "
                    "receiver CLIP"
                )
            rows.append(torch.from_numpy(np.asarray(cache.get(image_id), dtype=np.float32)))
        return torch.stack(rows).to(batch.clip_features.device)

    def forward(self, captioner: Captioner, batch: CaptionBatch) -> ObjectiveOutput:
        if self.kl_coefficient > 0:  # before the rollout: a BLIP captioner has no un-prefixed LM
            check_reference_lm(captioner, "DiscriTune: kl_coefficient > 0")
        features = batch.clip_features  # the captioner's input
        images = self.receiver_image_features(batch)  # what the receiver compares captions with
        if images.dim() != 2:
            raise ValueError("DiscriTune reads pooled CLIP features (B, D); grid features are not its input")
        receiver = self.receiver
        if receiver.device != features.device:
            receiver.to(features.device)
        if images.shape[-1] != receiver.dim:
            raise ValueError(
                f"DiscriTune: the batch's features have size {images.shape[-1]} but the receiver CLIP "
                f"embeds in {receiver.dim}: they must come from the same CLIP (or set "
                "receiver_features_dir to caches made with the receiver)"
            )

        # 1. Rollout, cut after the stop; EOS dropped, a "." kept as caption text. With k samples per image
        # the B·k captions are image-major. No gradient, unless log π comes from the rollout itself.
        k = self.baseline.samples_per_image
        rollout = self.rollout if k == 1 else replace(self.rollout, num_return_sequences=k)
        if self.log_probs_from_rollout:
            if not isinstance(captioner, ClipCaptioner):
                raise ValueError(
                    "DiscriTune: log_probs_from_rollout needs a ClipCaptioner (a prefix LM decoded by "
                    f"generate), got {type(captioner).__name__}; drop it to score captions with a "
                    "teacher-forced pass"
                )
            caption_ids, rollout_ids, rollout_logits = captioner.rollout_with_logits(features, rollout)
        else:
            caption_ids = captioner.generate_ids(features, rollout, keep_mode=self.rollout_dropout)
        texts = self._texts(captioner, caption_ids)

        reference_texts = None
        if self.baseline.needs_greedy_reference:
            with torch.no_grad():
                greedy = replace(self.rollout, do_sample=False)
                reference_texts = self._texts(captioner, captioner.generate_ids(features, greedy))

        # 2. The receiver scores every caption against every image of the batch. It reads the captions in
        # its own dtype (float32 unless loaded otherwise) and the rewards are float32, whatever autocast the
        # step runs under: with CLIP's logit scale of 100, bf16 rounding would move rewards by ~0.1 nat.
        with torch.no_grad(), full_precision(features.device):
            text_embeds = receiver.encode_text(texts)
            candidates, offset = self._candidates(images.detach().float())
            owners = torch.arange(features.shape[0], device=features.device).repeat_interleave(k)
            targets = offset + owners
            negatives = self._hard_negatives(images, batch.image_ids)
            if negatives is not None:
                rewards = discriminative_reward_with_negatives(
                    text_embeds, candidates, targets, negatives.repeat_interleave(k, 0), receiver.logit_scale
                )
            else:
                rewards = self._rewards(text_embeds, candidates, targets)
            reference_losses = None
            if reference_texts is not None:
                greedy_rewards = self._rewards(
                    receiver.encode_text(reference_texts), candidates, offset + owners[::k]
                )
                reference_losses = (-greedy_rewards).repeat_interleave(k)
            similarities = text_embeds @ torch.nn.functional.normalize(candidates, dim=-1).T
            picked = similarities.argmax(1) == targets

        # 3. log π of the same captions, with gradient: one teacher-forced pass, or the rollout's own logits
        # (position t of both predicts caption token t; both count the tokens before the stop).
        tokens, lengths = self._caption_tokens(captioner, caption_ids)
        if self.log_probs_from_rollout:
            logits, token_ids = rollout_logits, rollout_ids
        else:
            logits = captioner(features.repeat_interleave(k, dim=0) if k > 1 else features, tokens).logits
            token_ids = tokens.input_ids
        stopped = self._stopped(captioner, caption_ids, rollout)
        log_probs = self._log_probs(logits, token_ids, lengths, stopped, rollout.max_new_tokens)
        terms: dict[str, torch.Tensor] = {}
        if self.kl_coefficient > 0:
            with torch.no_grad():
                reference_log_probs = self._unprefixed_log_probs(captioner, tokens, lengths, stopped, rollout)
                kl = log_probs.detach() - reference_log_probs
            rewards = rewards - self.kl_coefficient * kl
            terms["kl"] = kl.mean()

        if not (torch.isfinite(rewards).all() and torch.isfinite(log_probs).all()):
            zero = log_probs.sum() * 0.0 if torch.isfinite(log_probs).all() else features.new_zeros(())
            reason = "DiscriTune: non-finite reward or log-probability"
            return ObjectiveOutput(loss=zero, terms={}, skip=True, skip_reason=reason)

        losses = -rewards
        baseline = self.baseline(losses, reference_losses)
        loss = reinforce_loss(rewards, baseline, log_probs).mean()
        if self.training:
            self.baseline.update(losses)
        return ObjectiveOutput(
            loss=loss,
            terms={
                **terms,
                "reward": rewards.mean(),
                "baseline": baseline.mean(),
                "log_prob": log_probs.detach().mean(),
                "caption_tokens": lengths.float().mean(),
                "batch_p_at_1": picked.float().mean(),
                "candidates": torch.tensor(float(len(candidates))),
                "captions": torch.tensor(float(len(texts))),
            },
        )

    def _log_probs(
        self,
        logits: torch.Tensor,
        token_ids: torch.Tensor,
        lengths: torch.Tensor,
        stopped: torch.Tensor,
        max_new_tokens: int,
    ) -> torch.Tensor:
        """(B,) log π under ``log_prob_normalisation`` from (B, T, V) logits predicting (B, T) tokens."""
        if self.log_prob_normalisation == "mean":
            return caption_log_probs(logits, token_ids, lengths)
        return egg_caption_log_probs(
            logits, token_ids, lengths, egg_row_lengths(lengths, stopped, max_new_tokens)
        )

    @staticmethod
    def _stopped(captioner: Captioner, caption_ids: list[list[int]], rollout: DecodingConfig) -> torch.Tensor:
        """(B,) whether each caption ended at a stop (EOS, or a "." token kept as its last token) rather
        than at the length cap: only then does EGG's generate write an EOS after it."""
        stops = set(captioner.stop_ids(rollout))
        return torch.tensor(
            [len(ids) < rollout.max_new_tokens or (bool(ids) and ids[-1] in stops) for ids in caption_ids],
            device=captioner.device,
        )

    def _unprefixed_log_probs(
        self,
        captioner: Captioner,
        tokens: CaptionTokens,
        lengths: torch.Tensor,
        stopped: torch.Tensor,
        rollout: DecodingConfig,
    ) -> torch.Tensor:
        """log p_LM of each caption (same tokens and normalisation as log π) under the frozen LM, given
        only a start token instead of the image prefix."""
        reference = reference_lm(self, captioner)
        start = start_token_id(reference)
        batch = tokens.input_ids.shape[0]
        input_ids = torch.cat([tokens.input_ids.new_full((batch, 1), start), tokens.input_ids[:, :-1]], dim=1)
        attention_mask = torch.cat(
            [tokens.attention_mask.new_ones((batch, 1)), tokens.attention_mask[:, :-1]], 1
        )
        embeds = reference.embed(input_ids).to(reference.dtype)
        logits = reference(embeds, attention_mask)
        return self._log_probs(logits, tokens.input_ids, lengths, stopped, rollout.max_new_tokens)

    def _hard_negatives(self, features: torch.Tensor, image_ids: list[str]) -> torch.Tensor | None:
        """(B, H, D) each image's hard distractors from the training bank, or None when off."""
        if not self.hard_negatives:
            return None
        bank, cache = self._bank, self._bank_cache
        if bank is None:
            raise RuntimeError("DiscriTune: hard_negatives are on but setup() has not loaded the bank")
        rows = [cache.index_of(i) if i in cache else -1 for i in image_ids]
        exclude = torch.tensor(rows, device=features.device).expand(len(rows), -1)
        bank = bank.to(features.device)
        indices = hard_negative_indices(
            features, bank, exclude, self.hard_negatives, self.duplicate_threshold
        )
        return bank[indices]

    def _rewards(
        self, text_embeds: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        if self.discriminative:
            return discriminative_reward(text_embeds, candidates, targets, self.receiver.logit_scale)
        return cosine_reward(text_embeds, candidates, targets)

    @staticmethod
    def _texts(captioner: Captioner, caption_ids: list[list[int]]) -> list[str]:
        return [
            text.strip() for text in captioner.tokenizer.batch_decode(caption_ids, skip_special_tokens=True)
        ]

    def _candidates(self, features: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The images every caption competes against, and where this rank's own images start among them.

        Args:
            features: (B, D) this rank's image embeddings.

        Returns:
            (N, D) candidates: ``features`` itself, or with ``global_distractors`` under DDP, every rank's
            features in rank order (N = the global batch); and the offset of this rank's first image.
        """
        if not (self.global_distractors and dist.is_available() and dist.is_initialized()):
            return features, 0
        world, rank = dist.get_world_size(), dist.get_rank()
        # Ranks may hold different batch sizes (the last batch): gather sizes, pad, gather, trim.
        size = torch.tensor([features.shape[0]], device=features.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        counts = [int(s) for s in sizes]
        padded = features.new_zeros((max(counts), features.shape[1]))
        padded[: features.shape[0]] = features
        gathered = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        candidates = torch.cat([block[:count] for block, count in zip(gathered, counts, strict=True)])
        return candidates, sum(counts[:rank])

    @staticmethod
    def _caption_tokens(
        captioner: Captioner, caption_ids: list[list[int]]
    ) -> tuple[CaptionTokens, torch.Tensor]:
        """The rollout's captions as teacher-forcing input, and their lengths (tokens before the stop).

        A caption that stopped at once is given its EOS as its only token (length 0), so that its
        log-probability, and the gradient pushing it up or down, still exist.
        """
        eos = captioner.lm.eos_token_id
        rows = [ids if ids else [eos] for ids in caption_ids]
        lengths = torch.tensor([len(ids) for ids in caption_ids], dtype=torch.long, device=captioner.device)
        return CaptionTokens.from_rows(rows, captioner.lm.pad_token_id, captioner.device), lengths
