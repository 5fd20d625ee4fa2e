"""The rewards of the policy-gradient objective: objects scoring a step's captions, summed with weights.

Each reward is an ``nn.Module`` chosen in YAML by ``class_path`` and given a ``weight``; the objective's
reward is ``Σ weight_i · R_i``, and each ``R_i`` is logged on its own (``reward/<name>``) when there are
several or a weight is not 1.

- :class:`RetrievalReward`: DiscriTune's, the log-probability that a frozen CLIP retrieves the caption's
  image among the batch's (and optionally hard, and other ranks') images.
- :class:`ClipScoreReward`: CLIP-S, ``2.5 · max(cos(image, "A photo depicts " + caption), 0)`` (Hessel et
  al. 2021), the reward of CLIP-Caption-Reward (Cho et al. 2022).
- :class:`CiderReward`: CIDEr-D against the image's references (self-critical training, Rennie et al.
  2017), document frequencies from the training split's references, in process.
- :class:`LengthReward`: minus the caption's length in words, or its distance to a target length.

Legend for shapes: B images in the batch, N = B·K captions (image-major), D CLIP embedding size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from clipcap.clip.encoder import ClipEncoder
from clipcap.data.batch import CaptionBatch
from clipcap.features.cache import FeatureCache, cache_expectation
from clipcap.frozen import keep_unregistered
from clipcap.metrics.cider import CiderD
from clipcap.metrics.clip_scores import CLIP_SCORE_WEIGHT, clip_score, prompted
from clipcap.metrics.ptb import ptb_tokenize_all
from clipcap.objectives.base import TrainingData
from clipcap.objectives.rewards import (
    cosine_reward,
    discriminative_reward,
    discriminative_reward_with_negatives,
    hard_negative_indices,
)


@dataclass
class RolloutCaptions:
    """A step's captions, as rewards read them.

    Attributes:
        texts: N decoded captions, image-major.
        owners: (N,) the row of each caption's image in ``batch``.
        batch: the step's batch (its images' features, ids and references).

    A self-critical baseline's greedy captions (one per image) are scored the same way; the objective
    drops the terms their rewards log.
    """

    texts: list[str]
    owners: torch.Tensor
    batch: CaptionBatch


@dataclass
class RewardOutput:
    """(N,) float32 rewards, and named scalars worth logging."""

    values: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


class Reward(nn.Module):
    """A reward of captions (the base class). Computed without gradients, in float32.

    Args:
        weight: its weight in the objective's sum; must be finite.
        name: its name in the logs (``reward/<name>``); the class's own by default.

    Attributes:
        needs_references: the reward compares captions with the image's reference captions.
    """

    needs_references: bool = False
    default_name: str = "reward"

    def __init__(self, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__()
        if not math.isfinite(weight):
            raise ValueError(f"{type(self).__name__}: weight must be a finite number, got {weight}")
        self.weight = float(weight)
        self.name = name or self.default_name

    def setup(self, data: TrainingData, encoders: dict[str, ClipEncoder]) -> None:
        """Called once the data is known. ``encoders`` holds the CLIPs loaded so far by name, shared by the
        objective's rewards (a retrieval and a CLIP-S reward read one copy of a CLIP)."""

    def forward(self, captions: RolloutCaptions) -> RewardOutput:
        raise NotImplementedError


def shared_encoder(encoders: dict[str, ClipEncoder], name: str) -> ClipEncoder:
    """The CLIP named ``name``, loaded once per objective."""
    if name not in encoders:
        encoders[name] = ClipEncoder(name)
    return encoders[name]


class RetrievalReward(Reward):
    """DiscriTune's reward (Dessì et al. 2023): ``log softmax`` over the candidate images of a frozen CLIP's
    caption-image similarities, at the caption's own image; or, with ``discriminative=False``, the plain
    cosine of the caption with its image (the paper's appendix comparison).

    The receiver is the CLIP the data's features come from (``data.init_args.clip_model``), so the batch's
    cached features are its image embeddings, unless ``receiver_clip`` names another CLIP with its own caches.

    Args:
        weight, name: see :class:`Reward`.
        discriminative: the retrieval log-probability (True) or the plain cosine (False).
        receiver_clip: the CLIP that reads the captions; the data's ``clip_model`` when None. When it is
            another CLIP than the features' (a ViT-L/14 receiver for a captioner fed ViT-B/32 features, or
            any CLIP for a BLIP captioner, whose features are BLIP's), its image embeddings come from
            ``receiver_features_dir``.
        receiver_features_dir: feature caches made with ``receiver_clip``, one folder per split as
            ``clipcap features`` writes them (run it with ``--data.init_args.clip_model=<receiver>
            --data.init_args.features_dir=<this folder>``); needed only when the receiver differs from the
            data's CLIP. Caches made with another CLIP or of another dataset are refused.
        global_distractors: under DDP, every caption competes against the images of the whole global batch
            (all ranks' features are gathered) instead of its rank's share.
        hard_negatives: extra distractors per caption (H), the CLIP nearest neighbours of its image among the
            training split's cached features, on top of the in-batch ones (0 is off, the paper's).
        duplicate_threshold: neighbours at least this cosine-similar to the image are near-duplicates and
            never used as distractors; the image itself and the rest of the batch never are either.
    """

    default_name = "retrieval"

    def __init__(
        self,
        weight: float = 1.0,
        name: str | None = None,
        discriminative: bool = True,
        receiver_clip: str | None = None,
        receiver_features_dir: str | None = None,
        global_distractors: bool = False,
        hard_negatives: int = 0,
        duplicate_threshold: float = 0.95,
    ) -> None:
        super().__init__(weight, name)
        if hard_negatives < 0 or (hard_negatives and not discriminative):
            raise ValueError(
                "RetrievalReward: hard_negatives must be ≥ 0 and needs the discriminative reward, got "
                f"hard_negatives={hard_negatives}, discriminative={discriminative}"
            )
        self.discriminative = discriminative
        self.receiver_clip = receiver_clip
        self.receiver_features_dir = receiver_features_dir
        self.global_distractors = global_distractors
        self.hard_negatives = hard_negatives
        self.duplicate_threshold = duplicate_threshold
        # Frozen and large, or data: outside the module tree (no checkpoint copy, no optimizer).
        for attribute in ("_receiver", "_receiver_caches", "_bank", "_bank_cache"):
            keep_unregistered(self, attribute, None)

    @property
    def receiver(self) -> ClipEncoder:
        receiver = self._receiver
        if receiver is None:
            raise RuntimeError(
                "RetrievalReward has no receiver CLIP yet: it is loaded in setup() from receiver_clip or the "
                "data's clip_model (set data.init_args.clip_model or the reward's receiver_clip)"
            )
        return receiver

    def set_receiver(self, encoder: ClipEncoder) -> None:
        """Uses ``encoder`` as the receiver, e.g. one already loaded."""
        keep_unregistered(self, "_receiver", encoder)

    def setup(self, data: TrainingData, encoders: dict[str, ClipEncoder]) -> None:
        data_clip = data.clip_model
        name = self.receiver_clip or data_clip
        if name is None and self._receiver is None:
            raise ValueError(
                "RetrievalReward needs the receiver CLIP: set data.init_args.clip_model (the CLIP of the "
                "cached features) or the reward's receiver_clip"
            )
        if self.receiver_features_dir is not None and (self.receiver_clip in (None, data_clip)):
            raise ValueError(
                "RetrievalReward: receiver_features_dir is set but the receiver is the data's CLIP "
                f"({name!r}), whose features the batch already carries; set receiver_clip to the CLIP "
                "those caches were made with, or drop receiver_features_dir"
            )
        own_features = self.receiver_features_dir is not None or (
            self.receiver_clip is not None and data_clip is not None and self.receiver_clip != data_clip
        )
        if self._receiver is None and name is not None:
            self.set_receiver(shared_encoder(encoders, name))
        if own_features and self._receiver_caches is None:
            self._open_receiver_caches(data, name)
        if self.hard_negatives and self._bank is None:
            if data.train_features is None:
                raise ValueError("RetrievalReward: hard_negatives needs the training split's cached features")
            caches = self._receiver_caches
            # Distractors live in the receiver's space: its own training cache when it has one.
            cache = caches["train"] if caches else data.train_features()
            keep_unregistered(self, "_bank", torch.from_numpy(np.asarray(cache.features, dtype=np.float32)))
            keep_unregistered(self, "_bank_cache", cache)

    def _open_receiver_caches(self, data: TrainingData, name: str) -> None:
        """Opens the receiver's own feature caches (every split there is), checked against its CLIP."""
        if self.receiver_features_dir is None:
            raise ValueError(
                f"RetrievalReward: receiver_clip={name!r} is not the CLIP of the data's features "
                f"({data.clip_model!r}), so the receiver needs its own image "
                "features: extract them with `clipcap features --config <config> "
                f"--data.init_args.clip_model={name} --data.init_args.features_dir=<folder>` and set "
                "the reward's receiver_features_dir=<folder>"
            )
        receiver = self.receiver
        folder = Path(self.receiver_features_dir).expanduser()
        caches = {}
        for split in (
            sorted(p.name for p in folder.iterdir() if FeatureCache.exists(p)) if folder.is_dir() else []
        ):
            caches[split] = FeatureCache.open(
                folder / split, expect=cache_expectation(receiver, dataset=data.dataset, split=split)
            )
        if "train" not in caches:
            raise ValueError(
                f"RetrievalReward: receiver_features_dir={folder} holds no training-split feature cache "
                f"made with {name!r} (found {sorted(caches) or 'none'})"
            )
        keep_unregistered(self, "_receiver_caches", caches)

    def receiver_image_features(self, batch: CaptionBatch) -> torch.Tensor:
        """(B, D_receiver) the receiver's embeddings of the batch's images: the batch's own features when
        the receiver is the data's CLIP, else rows of the receiver's caches, looked up by image id."""
        caches = self._receiver_caches
        if not caches:
            images = batch.clip_features
        else:
            rows = []
            for image_id in batch.image_ids:
                cache = next((c for c in caches.values() if image_id in c), None)
                if cache is None:
                    raise KeyError(
                        f"RetrievalReward: image {image_id!r} has no features in the receiver's caches under "
                        f"{self.receiver_features_dir} (splits {sorted(caches)}); extract them with the "
                        "receiver CLIP"
                    )
                rows.append(torch.from_numpy(np.asarray(cache.get(image_id), dtype=np.float32)))
            images = torch.stack(rows).to(batch.clip_features.device)
        if images.dim() != 2:
            raise ValueError(
                "RetrievalReward reads pooled CLIP features (B, D); grid features are not its input"
            )
        receiver = self.receiver
        if receiver.device != images.device:
            receiver.to(images.device)
        if images.shape[-1] != receiver.dim:
            raise ValueError(
                f"RetrievalReward: the batch's features have size {images.shape[-1]} but the receiver CLIP "
                f"embeds in {receiver.dim}: they must come from the same CLIP (or set "
                "receiver_features_dir to caches made with the receiver)"
            )
        return images

    def forward(self, captions: RolloutCaptions) -> RewardOutput:
        receiver = self.receiver
        images = self.receiver_image_features(captions.batch).detach().float()
        text_embeds = receiver.encode_text(captions.texts)
        candidates, offset = self._candidates(images)
        targets = offset + captions.owners
        negatives = self._hard_negatives(images, captions.batch.image_ids)
        if negatives is not None:
            values = discriminative_reward_with_negatives(
                text_embeds, candidates, targets, negatives[captions.owners], receiver.logit_scale
            )
        elif self.discriminative:
            values = discriminative_reward(text_embeds, candidates, targets, receiver.logit_scale)
        else:
            values = cosine_reward(text_embeds, candidates, targets)
        similarities = text_embeds @ torch.nn.functional.normalize(candidates, dim=-1).T
        picked = similarities.argmax(1) == targets
        terms = {"batch_p_at_1": picked.float().mean(), "candidates": torch.tensor(float(len(candidates)))}
        return RewardOutput(values, terms)

    def _hard_negatives(self, features: torch.Tensor, image_ids: list[str]) -> torch.Tensor | None:
        """(B, H, D) each image's hard distractors from the training bank, or None when off."""
        if not self.hard_negatives:
            return None
        bank, cache = self._bank, self._bank_cache
        if bank is None:
            raise RuntimeError("RetrievalReward: hard_negatives are on but setup() has not loaded the bank")
        rows = [cache.index_of(i) if i in cache else -1 for i in image_ids]
        exclude = torch.tensor(rows, device=features.device).expand(len(rows), -1)
        if bank.device != features.device:  # moved once: the whole split's features, not a copy per step
            bank = bank.to(features.device)
            keep_unregistered(self, "_bank", bank)
        indices = hard_negative_indices(
            features, bank, exclude, self.hard_negatives, self.duplicate_threshold
        )
        return bank[indices]

    def _candidates(self, features: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The images every caption competes against, and where this rank's own images start among them:
        ``features`` itself, or with ``global_distractors`` under DDP every rank's features in rank order."""
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


class ClipScoreReward(Reward):
    """CLIP-S as a reward: ``w · max(cos(image, text), 0)`` with the text ``"<prompt> <caption>"`` (Hessel
    et al. 2021; the reward of Cho et al. 2022's CLIP-Caption-Reward), read by the data's CLIP, whose image
    embeddings the batch carries.

    Args:
        weight, name: see :class:`Reward` (``weight`` is the mixture's weight; ``w`` is ``scale``).
        scale: ``w``, 2.5 in the paper.
        prompt: put before each caption ("A photo depicts", as the paper and ``CaptionEvaluation``);
            None or "" scores the caption alone.
        clip_model: the CLIP reading the captions; the data's ``clip_model`` when None (another CLIP would
            need its own image features, which this reward does not read: it is refused).
    """

    default_name = "clip_s"

    def __init__(
        self,
        weight: float = 1.0,
        name: str | None = None,
        scale: float = CLIP_SCORE_WEIGHT,
        prompt: str | None = "A photo depicts",
        clip_model: str | None = None,
    ) -> None:
        super().__init__(weight, name)
        self.scale = scale
        self.prompt = prompt or ""
        self.clip_model = clip_model
        keep_unregistered(self, "_clip", None)

    def set_clip(self, encoder: ClipEncoder) -> None:
        keep_unregistered(self, "_clip", encoder)

    def setup(self, data: TrainingData, encoders: dict[str, ClipEncoder]) -> None:
        if self.clip_model is not None and data.clip_model is not None and self.clip_model != data.clip_model:
            raise ValueError(
                f"ClipScoreReward: clip_model={self.clip_model!r} is not the CLIP of the data's features "
                f"({data.clip_model!r}), whose image embeddings it reads; drop clip_model"
            )
        name = self.clip_model or data.clip_model
        if self._clip is None:
            if name is None:
                raise ValueError("ClipScoreReward needs the data's CLIP: set data.init_args.clip_model")
            self.set_clip(shared_encoder(encoders, name))

    def forward(self, captions: RolloutCaptions) -> RewardOutput:
        clip = self._clip
        if clip is None:
            raise RuntimeError("ClipScoreReward: setup() has not loaded the CLIP")
        images = captions.batch.clip_features
        if images.dim() != 2 or images.shape[-1] != clip.dim:
            raise ValueError(
                f"ClipScoreReward: the batch's features have shape {tuple(images.shape)}, not pooled "
                f"embeddings of the CLIP it scores with ({clip.dim})"
            )
        if clip.device != images.device:
            clip.to(images.device)
        texts = [prompted(self.prompt, text) for text in captions.texts]
        values = clip_score(images.float()[captions.owners], clip.encode_text(texts).float(), self.scale)
        return RewardOutput(values)


class CiderReward(Reward):
    """CIDEr-D of each caption against its image's references (self-critical training's reward, Rennie et
    al. 2017), in process (:class:`clipcap.metrics.cider.CiderD`, equal to pycocoevalcap's ``Cider``).

    Captions and references are tokenized as the evaluation's PTB tokenizer does
    (:func:`clipcap.metrics.ptb.ptb_tokenize_all`); the document frequencies come from the training split's
    reference sets, counted once at setup, as self-critical code precomputes them from the training
    references.

    Args:
        weight, name: see :class:`Reward`.
        kept_images: reference vectors kept between steps for at most this many images (then dropped and
            recomputed): COCO's 113k images would otherwise keep ~2 GB of n-gram dictionaries.
    """

    needs_references = True
    default_name = "cider"

    def __init__(self, weight: float = 1.0, name: str | None = None, kept_images: int = 20_000) -> None:
        super().__init__(weight, name)
        self.kept_images = kept_images
        keep_unregistered(self, "_cider", None)

    def setup(self, data: TrainingData, encoders: dict[str, ClipEncoder]) -> None:
        if not data.labelled:
            raise ValueError(
                "CiderReward needs the training images' reference captions, but the training data is "
                "unlabelled (data.init_args.unlabelled=true): drop the CIDEr reward or serve the references"
            )
        if data.train_references is None:
            raise ValueError(
                "CiderReward counts its document frequencies in the training split's references, and this "
                "run has no training data (a CaptionDataModule) to read them from"
            )
        if self._cider is None:
            corpus = [ptb_tokenize_all(references) for references in data.train_references()]
            if not any(corpus):
                raise ValueError("CiderReward: the training split has no reference captions")
            keep_unregistered(self, "_cider", CiderD(corpus))

    def forward(self, captions: RolloutCaptions) -> RewardOutput:
        cider = self._cider
        if cider is None:
            raise RuntimeError("CiderReward: setup() has not counted the document frequencies")
        batch = captions.batch
        owners = captions.owners.tolist()
        if len(cider.kept) > self.kept_images:
            cider.kept.clear()
        # An image's references are tokenized only until its vectors are kept (CiderD reads them once).
        keys: dict[int, tuple[str, tuple[str, ...]]] = {}
        references: dict[int, list[str]] = {}
        for owner in sorted(set(owners)):
            raw = batch.references[owner] if owner < len(batch.references) else []
            if not raw:
                raise ValueError(
                    f"CiderReward: image {batch.image_ids[owner]!r} has no reference captions; CIDEr-D "
                    "rewards need every training image's references"
                )
            keys[owner] = (batch.image_ids[owner], tuple(raw))
            references[owner] = [] if keys[owner] in cider.kept else ptb_tokenize_all(raw)
        scores = cider.score(
            ptb_tokenize_all(captions.texts), [references[o] for o in owners], [keys[o] for o in owners]
        )
        return RewardOutput(torch.from_numpy(scores).float().to(captions.owners.device))


class LengthReward(Reward):
    """A length term: ``−(words)``, or ``−|words − target|`` with a target (give it a small weight, or a
    negative one to reward length). Words are the caption's whitespace-separated tokens.

    Args:
        weight, name: see :class:`Reward`.
        target: the length in words a caption is pulled towards; None penalises every word.
    """

    default_name = "length"

    def __init__(self, weight: float = 1.0, name: str | None = None, target: int | None = None) -> None:
        super().__init__(weight, name)
        if target is not None and target < 0:
            raise ValueError(f"LengthReward: target must be ≥ 0, got {target}")
        self.target = target

    def forward(self, captions: RolloutCaptions) -> RewardOutput:
        words = torch.tensor(
            [float(len(text.split())) for text in captions.texts], device=captions.owners.device
        )
        values = -words if self.target is None else -(words - self.target).abs()
        return RewardOutput(values)
