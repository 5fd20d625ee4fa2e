"""torchmetrics wrappers for caption metrics whose states gather across DDP ranks.

Images are identified by their dataset index (position in the evaluation split, file order), because
strings cannot be all-gathered. ``DistributedSampler`` repeats samples to give every rank the same number,
so :meth:`compute` keeps one entry per index and sorts by index before scoring: a multi-rank run gives
exactly the single-process numbers.

Call ``update`` (not ``forward``) per batch and ``compute`` once per evaluation; in DDP every rank must
call ``compute``, :meth:`NLGScores.captions` and :meth:`ClipCaptionScores.per_image`, since each gathers.

Legend for shapes: B = images in a batch, D = the scoring CLIP's embedding size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torchmetrics import Metric

from clipcap.clip.encoder import ClipEncoder
from clipcap.frozen import keep_unregistered
from clipcap.metrics.clip_scores import (
    clip_score,
    max_reference_similarity,
    prompted,
    ref_clip_score,
    ref_compare,
    retrieval_p_at_1_blocks,
    retrieval_p_at_1_random,
    retrieval_recall_at_k,
)
from clipcap.metrics.nlg import DEFAULT_METRICS, SUPPORTED_METRICS, coco_caption_scores

logger = logging.getLogger(__name__)


def first_occurrences(indices: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of each distinct index, ordered by index.

    Args:
        indices: (K,) integer dataset indices, possibly repeated.

    Returns:
        (U,) int64 positions into ``indices``, U = number of distinct indices.
    """
    sorted_indices, order = torch.sort(indices, stable=True)
    keep = torch.ones_like(sorted_indices, dtype=torch.bool)
    keep[1:] = sorted_indices[1:] != sorted_indices[:-1]
    return order[keep]


class _GatheredListMetric(Metric):
    """A metric whose states are lists of tensors concatenated across ranks (``dist_reduce_fx="cat"``).

    Each list starts with an empty tensor of the state's own dtype and trailing shape. Without it, a rank
    that saw no batch would send torchmetrics' stand-in for an empty list, a (0,) tensor of the metric's
    float dtype, which ``all_gather`` cannot combine with the other ranks' int64 or (B, D) tensors.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._gathered_specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}

    def _add_gathered_state(
        self, name: str, dtype: torch.dtype, trailing_shape: tuple[int, ...] = ()
    ) -> None:
        self._gathered_specs[name] = (dtype, trailing_shape)
        self.add_state(name, default=[], dist_reduce_fx="cat")
        getattr(self, name).append(self._empty(name))

    def _empty(self, name: str) -> torch.Tensor:
        dtype, trailing_shape = self._gathered_specs[name]
        return torch.empty((0, *trailing_shape), dtype=dtype, device=self.device)

    def reset(self) -> None:
        super().reset()
        for name in self._gathered_specs:
            getattr(self, name).append(self._empty(name))

    def _append(self, name: str, value: torch.Tensor) -> None:
        dtype, _ = self._gathered_specs[name]
        getattr(self, name).append(value.detach().to(device=self.device, dtype=dtype))

    def _gathered(self, name: str) -> torch.Tensor:
        """The state as one tensor: a list locally, already one tensor once synced."""
        value = getattr(self, name)
        return torch.cat(value) if isinstance(value, list) else value

    @contextmanager
    def _synced(self) -> Iterator[None]:
        """Gathers the states across ranks for the block, as ``compute`` does, then restores local ones."""
        if self._is_synced:  # inside compute(), already gathered
            yield
            return
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync
        ):
            yield

    def _check_indices(self, indices: torch.Tensor | Sequence[int], num_images: int) -> torch.Tensor:
        indices = torch.as_tensor(indices)
        if indices.ndim != 1 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise ValueError(
                f"indices must be a (B,) integer tensor, got {indices.dtype} {tuple(indices.shape)}"
            )
        indices = indices.long()
        bad = indices[(indices < 0) | (indices >= num_images)]
        if bad.numel():
            raise ValueError(
                f"unknown dataset index {int(bad[0])}: the references cover {num_images} images "
                f"(indices 0..{num_images - 1})"
            )
        return indices


def _check_captions(captions: Sequence[str], batch_size: int) -> list[str]:
    if isinstance(captions, str):
        raise ValueError("captions must be a list of strings, one per index, not one string")
    captions = list(captions)
    if len(captions) != batch_size:
        raise ValueError(f"got {len(captions)} captions for {batch_size} indices")
    for caption in captions:
        if not isinstance(caption, str):
            raise ValueError(f"captions must be strings, got {caption!r}")
    return captions


def _check_groups(groups: Sequence[str | None] | None, num_images: int) -> list[str | None] | None:
    if groups is None:
        return None
    groups = list(groups)
    if len(groups) != num_images:
        raise ValueError(f"groups has {len(groups)} entries for {num_images} images")
    return groups


class NLGScores(_GatheredListMetric):
    """BLEU, METEOR, ROUGE-L, CIDEr (and SPICE when available) of captions identified by dataset index.

    Args:
        reference_sets: set name → per-index reference captions (all sets cover the same images). One set
            named ``""`` in the usual case; Concadia passes ``{"caption": ..., "description": ...}``.
        metrics: names as in :func:`clipcap.metrics.nlg.coco_caption_scores`.
        groups: per-index subset name (nocaps ``in-domain`` / ``near-domain`` / ``out-domain``) or None.
        allow_empty: score an empty caption as a miss rather than raising.
        **kwargs: passed to ``torchmetrics.Metric``.

    ``compute()`` returns metric name → value: ``Bleu_1``..``Bleu_4``, ``METEOR``, ``ROUGE_L``, ``CIDEr``
    (``SPICE``) for the set ``""``; ``<set>/<metric>`` for a named set; ``<metric>/<group>`` (or
    ``<set>/<metric>/<group>``) per group.
    """

    def __init__(
        self,
        reference_sets: Mapping[str, Sequence[Sequence[str]]],
        metrics: Sequence[str] = DEFAULT_METRICS,
        groups: Sequence[str | None] | None = None,
        allow_empty: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not reference_sets:
            raise ValueError("reference_sets is empty: give at least one set, e.g. {'': references}")
        sizes = {name: len(references) for name, references in reference_sets.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"reference sets must cover the same images; their sizes differ: {sizes}")
        unknown = set(metrics) - set(SUPPORTED_METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {SUPPORTED_METRICS}")
        self.reference_sets = {
            name: [
                references if isinstance(references, str) else list(references) for references in per_image
            ]
            for name, per_image in reference_sets.items()
        }
        self.num_images = next(iter(sizes.values()))
        self.metrics = tuple(metrics)
        self.groups = _check_groups(groups, self.num_images)
        self.allow_empty = allow_empty
        self._add_gathered_state("indices", torch.long)
        # Captions as one UTF-8 byte stream with per-caption lengths: 1-D states concatenate across
        # batches and ranks whatever the caption lengths (a (B, L) padded state would need one L everywhere).
        self._add_gathered_state("caption_bytes", torch.uint8)
        self._add_gathered_state("caption_lengths", torch.long)

    def update(self, indices: torch.Tensor, captions: Sequence[str]) -> None:
        """Adds a batch of generated captions.

        Args:
            indices: (B,) dataset indices of the images.
            captions: B generated captions.
        """
        indices = self._check_indices(indices, self.num_images)
        captions = _check_captions(captions, len(indices))
        encoded = [caption.encode("utf-8") for caption in captions]
        stream = b"".join(encoded)
        data = (
            torch.frombuffer(bytearray(stream), dtype=torch.uint8)
            if stream
            else torch.empty(0, dtype=torch.uint8)
        )
        self._append("indices", indices)
        self._append("caption_bytes", data)
        self._append("caption_lengths", torch.tensor([len(b) for b in encoded], dtype=torch.long))

    def _captions(self) -> dict[int, str]:
        indices = self._gathered("indices").cpu()
        lengths = self._gathered("caption_lengths").cpu()
        stream = self._gathered("caption_bytes").cpu().numpy().tobytes()
        if len(indices) != len(lengths) or int(lengths.sum()) != len(stream):
            raise RuntimeError("NLGScores states are inconsistent: indices, lengths and bytes disagree")
        starts = (torch.cumsum(lengths, 0) - lengths).tolist()
        lengths_list = lengths.tolist()
        return {
            int(indices[k]): stream[starts[k] : starts[k] + lengths_list[k]].decode("utf-8")
            for k in first_occurrences(indices).tolist()
        }

    def captions(self) -> dict[int, str]:
        """Dataset index → generated caption, one per index (gathered across ranks), sorted by index."""
        with self._synced():
            return self._captions()

    def compute(self) -> dict[str, float]:
        """Scores every set (and group) on the de-duplicated captions; see the class docstring for keys."""
        captions = self._captions()
        if not captions:
            raise ValueError("NLGScores has no captions to score: call update() first")
        for index in captions:
            if index >= self.num_images:
                raise ValueError(
                    f"unknown dataset index {index}: the references cover {self.num_images} images"
                )
        groups = {index: self.groups[index] for index in captions} if self.groups is not None else None
        scores: dict[str, float] = {}
        for name, per_image in self.reference_sets.items():
            set_scores = coco_caption_scores(
                captions,
                {index: per_image[index] for index in captions},
                self.metrics,
                allow_empty=self.allow_empty,
                groups=groups,
            )
            prefix = f"{name}/" if name else ""
            scores.update({prefix + key: value for key, value in set_scores.items()})
        return scores


_PER_IMAGE_SCORES = ("clip_score", "ref_clip_score", "ref_compare")


@contextmanager
def _autocast_disabled(*devices: torch.device) -> Iterator[None]:
    with ExitStack() as stack:
        for device_type in sorted({device.type for device in devices}):
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield


class ClipCaptionScores(_GatheredListMetric):
    """CLIP-S, RefCLIP-S, RefCompare and text → image retrieval of captions identified by dataset index.

    Candidates and references are encoded with the same prompt (so every comparison is like with like) by
    the scoring CLIP, which may differ from the captioner's. Encoding and similarities run in float32 with
    autocast disabled, so scores are the same under bf16 autocast. Identical texts are encoded once, so a
    candidate equal to a reference ties with it exactly (and does not count for RefCompare).

    The encoder is deliberately not registered as a submodule: it stays out of ``state_dict`` (no CLIP copy
    in checkpoints) and is not moved by ``.to()``; its owner places it. Embeddings are moved between its
    device and the metric's as needed.

    Args:
        encoder: the scoring CLIP.
        references: per-index reference captions; every image needs at least one.
        groups: per-index subset name or None; means are also reported per group.
        prompt: prepended (with a space) to candidates and references; "" for none.
        block_size: images per block for :func:`~clipcap.metrics.clip_scores.retrieval_p_at_1_blocks`.
        num_distractors: for :func:`~clipcap.metrics.clip_scores.retrieval_p_at_1_random`.
        recall_ks: K values of full-set recall@K.
        seed: seeds the random distractors.
        text_batch_size: texts per ``encode_text`` call.
        **kwargs: passed to ``torchmetrics.Metric``.

    ``compute()`` returns: ``clip_score``, ``ref_clip_score``, ``ref_compare`` (means over images; CLIP-S
    and RefCLIP-S on Hessel's 0–2.5 scale, RefCompare a fraction in [0, 1]); ``retrieval_p_at_1`` (blocks)
    and ``retrieval_p_at_1_random`` (each omitted, with one logged warning, when there are too few images);
    ``recall_at_<K>``; all retrieval values in percent; and ``<mean name>/<group>`` per group.
    """

    def __init__(
        self,
        encoder: ClipEncoder,
        references: Sequence[Sequence[str]],
        groups: Sequence[str | None] | None = None,
        prompt: str = "A photo depicts",
        block_size: int = 100,
        num_distractors: int = 99,
        recall_ks: Sequence[int] = (1, 5, 10),
        seed: int = 0,
        text_batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.references = [[refs] if isinstance(refs, str) else list(refs) for refs in references]
        without = [index for index, refs in enumerate(self.references) if not refs]
        if without:
            raise ValueError(
                f"{len(without)} image(s) have no reference captions, e.g. indices {without[:5]}; "
                "RefCLIP-S and RefCompare need at least one per image"
            )
        self.num_images = len(self.references)
        self.groups = _check_groups(groups, self.num_images)
        # Kept out of nn.Module registration on purpose (see the class docstring).
        keep_unregistered(self, "encoder", encoder)
        self.prompt = prompt
        self.block_size = block_size
        self.num_distractors = num_distractors
        self.recall_ks = tuple(int(k) for k in recall_ks)
        self.seed = seed
        self.text_batch_size = text_batch_size
        self._warned: set[str] = set()
        dim = encoder.dim
        self._add_gathered_state("indices", torch.long)
        for name in _PER_IMAGE_SCORES:
            self._add_gathered_state(name, torch.float32)
        self._add_gathered_state("text_embeds", torch.float32, (dim,))
        self._add_gathered_state("image_embeds", torch.float32, (dim,))

    def _encode(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), D) float32 embeddings on the metric's device, each distinct text encoded once."""
        unique = list(dict.fromkeys(texts))
        chunks = [
            self.encoder.encode_text(unique[start : start + self.text_batch_size]).float()
            for start in range(0, len(unique), self.text_batch_size)
        ]
        table = torch.cat(chunks).to(self.device)
        position = {text: i for i, text in enumerate(unique)}
        return table[torch.tensor([position[text] for text in texts], device=self.device)]

    def update(self, indices: torch.Tensor, image_embeds: torch.Tensor, captions: Sequence[str]) -> None:
        """Scores a batch of generated captions against their images and references.

        Args:
            indices: (B,) dataset indices of the images.
            image_embeds: (B, D) image embeddings from the scoring CLIP (not necessarily normalised).
            captions: B generated captions.
        """
        indices = self._check_indices(indices, self.num_images)
        captions = _check_captions(captions, len(indices))
        dim = self._gathered_specs["image_embeds"][1][0]
        if image_embeds.shape != (len(indices), dim):
            raise ValueError(
                f"image_embeds must be ({len(indices)}, {dim}) from the scoring CLIP, "
                f"got {tuple(image_embeds.shape)}"
            )
        reference_texts: list[str] = []
        owner: list[int] = []
        for row, index in enumerate(indices.tolist()):
            reference_texts.extend(self.references[index])
            owner.extend([row] * len(self.references[index]))
        texts = [prompted(self.prompt, text) for text in [*captions, *reference_texts]]
        with torch.no_grad(), _autocast_disabled(self.device, self.encoder.device, image_embeds.device):
            embeds = self._encode(texts)
            candidates, references = embeds[: len(captions)], embeds[len(captions) :]
            images = image_embeds.detach().to(device=self.device, dtype=torch.float32)
            reference_owner = torch.tensor(owner, dtype=torch.long, device=self.device)
            clip_scores = clip_score(images, candidates)
            max_ref_sims = max_reference_similarity(candidates, references, reference_owner)
            self._append("indices", indices)
            self._append("clip_score", clip_scores)
            self._append("ref_clip_score", ref_clip_score(clip_scores, max_ref_sims))
            self._append("ref_compare", ref_compare(images, candidates, references, reference_owner))
            self._append("text_embeds", candidates)
            self._append("image_embeds", images)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    def _deduplicated(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U,) sorted distinct indices and (U,) positions of their first entries in the states."""
        indices = self._gathered("indices")
        keep = first_occurrences(indices)
        return indices[keep], keep

    def compute(self) -> dict[str, float]:
        """Means, retrieval and per-group means over the de-duplicated images; keys in the class docstring."""
        indices, keep = self._deduplicated()
        num_images = len(indices)
        if num_images == 0:
            raise ValueError("ClipCaptionScores has no captions to score: call update() first")
        per_image = {name: self._gathered(name)[keep] for name in _PER_IMAGE_SCORES}
        scores = {name: float(values.mean()) for name, values in per_image.items()}
        texts = self._gathered("text_embeds")[keep]
        images = self._gathered("image_embeds")[keep]
        if num_images >= self.block_size:
            scores["retrieval_p_at_1"] = retrieval_p_at_1_blocks(texts, images, self.block_size)[0]
        else:
            self._warn_once(
                "blocks",
                f"retrieval_p_at_1 omitted: {num_images} images, fewer than one block of {self.block_size}",
            )
        if num_images > self.num_distractors:
            scores["retrieval_p_at_1_random"] = retrieval_p_at_1_random(
                texts, images, self.num_distractors, self.seed
            )
        else:
            self._warn_once(
                "random",
                f"retrieval_p_at_1_random omitted: {num_images} images, fewer than the "
                f"{self.num_distractors + 1} that {self.num_distractors} distractors need",
            )
        recall = retrieval_recall_at_k(texts, images, self.recall_ks)
        scores.update({f"recall_at_{k}": value for k, value in recall.items()})
        if self.groups is not None:
            image_groups = [self.groups[index] for index in indices.tolist()]
            for group in sorted({group for group in image_groups if group is not None}):
                mask = torch.tensor([g == group for g in image_groups], device=indices.device)
                for name, values in per_image.items():
                    scores[f"{name}/{group}"] = float(values[mask].mean())
        return scores

    def per_image(self) -> dict[int, dict[str, float]]:
        """Dataset index → ``clip_score``, ``ref_clip_score``, ``ref_compare`` (gathered, de-duplicated)."""
        with self._synced():
            indices, keep = self._deduplicated()
            values = {name: self._gathered(name)[keep].tolist() for name in _PER_IMAGE_SCORES}
            return {
                int(index): {name: values[name][row] for name in _PER_IMAGE_SCORES}
                for row, index in enumerate(indices.tolist())
            }
