"""CLIP-based caption scores as pure functions on embeddings.

Legend for shapes: N = images, each with one candidate caption; M = the reference captions of all N images
together (ragged: reference ``j`` belongs to image ``reference_owner[j]``); D = CLIP embedding size.

Embeddings need not be normalised: every function L2-normalises inside. All arithmetic runs in float32
with autocast disabled, whatever the input dtype and the caller's autocast context, so scores do not depend
on bf16/fp16 mixed precision.

Ties are never counted in the caption's favour: RefCompare counts references strictly below the candidate,
and a retrieval is a hit only when the caption's own image scores strictly above every competitor.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

CLIP_SCORE_WEIGHT = 2.5
"""Hessel et al.'s ``w``: rescales CLIP-S from cosines (at most about 0.4 for ViT-B/32) towards [0, 1]."""

# Most similarity entries built at once by the chunked retrieval functions (16 MB of float32), so 5,000 ×
# 5,000 (or much larger) retrieval never materialises the full matrix.
_MAX_CHUNK_ELEMENTS = 1 << 22


@contextmanager
def _float32_math(device: torch.device) -> Iterator[None]:
    """Disables autocast on ``device`` (a bf16 autocast would otherwise run the matmuls in bf16)."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def _unit(embeds: torch.Tensor) -> torch.Tensor:
    return F.normalize(embeds.float(), dim=-1)


def _check_embeds(name: str, embeds: torch.Tensor) -> None:
    if embeds.ndim != 2:
        raise ValueError(f"{name} must be (N, D), got shape {tuple(embeds.shape)}")


def _check_pairs(first_name: str, first: torch.Tensor, second_name: str, second: torch.Tensor) -> None:
    _check_embeds(first_name, first)
    _check_embeds(second_name, second)
    if first.shape != second.shape:
        raise ValueError(
            f"{first_name} {tuple(first.shape)} and {second_name} {tuple(second.shape)} must have the same shape"
        )


def _check_owner(reference_owner: torch.Tensor, num_images: int, num_references: int) -> torch.Tensor:
    """Validates ``reference_owner`` (M,) and returns it as int64; every image must own a reference."""
    if reference_owner.ndim != 1 or reference_owner.shape[0] != num_references:
        raise ValueError(
            f"reference_owner must be ({num_references},), one image index per reference, "
            f"got shape {tuple(reference_owner.shape)}"
        )
    if reference_owner.dtype.is_floating_point or reference_owner.dtype == torch.bool:
        raise ValueError(f"reference_owner must hold integer image indices, got {reference_owner.dtype}")
    owner = reference_owner.long()
    if num_references and (int(owner.min()) < 0 or int(owner.max()) >= num_images):
        raise ValueError(f"reference_owner holds indices outside [0, {num_images}) for {num_images} images")
    counts = torch.bincount(owner, minlength=num_images)
    missing = (counts == 0).nonzero().flatten()
    if missing.numel():
        raise ValueError(
            f"{missing.numel()} image(s) have no reference captions, e.g. image(s) {missing[:5].tolist()}; "
            "RefCLIP-S and RefCompare need at least one reference per image"
        )
    return owner


def paired_cosine(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of matching rows.

    Args:
        first: (N, D) embeddings.
        second: (N, D) embeddings.

    Returns:
        (N,) float32 cosines.
    """
    _check_pairs("first", first, "second", second)
    with _float32_math(first.device):
        return (_unit(first) * _unit(second)).sum(dim=-1)


def prompted(prompt: str | None, text: str) -> str:
    """The text CLIP reads for CLIP-S: as Hessel et al.'s code, the prompt, one space, the caption (the
    caption alone when ``prompt`` is empty; a prompt already ending in a space gets no second one)."""
    if not prompt:
        return text
    return (prompt if prompt.endswith(" ") else prompt + " ") + text


def clip_score(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, weight: float = CLIP_SCORE_WEIGHT
) -> torch.Tensor:
    """CLIP-S (Hessel et al. 2021): ``weight · max(cos(image, text), 0)``.

    Args:
        image_embeds: (N, D) image embeddings.
        text_embeds: (N, D) embeddings of each image's candidate caption (with the prompt, e.g.
            "A photo depicts ...").
        weight: ``w``, 2.5 in the paper.

    Returns:
        (N,) float32 scores in ``[0, weight]``.
    """
    _check_pairs("image_embeds", image_embeds, "text_embeds", text_embeds)
    with _float32_math(image_embeds.device):
        return weight * paired_cosine(image_embeds, text_embeds).clamp(min=0)


def max_reference_similarity(
    candidate_embeds: torch.Tensor, reference_embeds: torch.Tensor, reference_owner: torch.Tensor
) -> torch.Tensor:
    """Per candidate, the largest cosine with its own image's references (the text side of RefCLIP-S).

    Args:
        candidate_embeds: (N, D) candidate caption embeddings.
        reference_embeds: (M, D) reference caption embeddings of all images, in any order.
        reference_owner: (M,) integer: reference ``j`` belongs to image ``reference_owner[j]``.

    Returns:
        (N,) float32 maximum cosines (not clamped, not weighted).

    Raises:
        ValueError: an image has no reference, or shapes disagree.
    """
    _check_embeds("candidate_embeds", candidate_embeds)
    _check_embeds("reference_embeds", reference_embeds)
    if reference_embeds.shape[1] != candidate_embeds.shape[1]:
        raise ValueError("candidate_embeds and reference_embeds must have the same embedding size")
    num_images = candidate_embeds.shape[0]
    owner = _check_owner(reference_owner.to(candidate_embeds.device), num_images, reference_embeds.shape[0])
    with _float32_math(candidate_embeds.device):
        similarities = (_unit(candidate_embeds)[owner] * _unit(reference_embeds)).sum(dim=-1)
        best = similarities.new_full((num_images,), float("-inf"))
        return best.scatter_reduce(0, owner, similarities, reduce="amax", include_self=True)


def ref_clip_score(clip_scores: torch.Tensor, max_ref_sims: torch.Tensor) -> torch.Tensor:
    """RefCLIP-S (Hessel et al. 2021): harmonic mean of CLIP-S and ``max(max_ref_sim, 0)``.

    As in the official code (``clipscore.py``), CLIP-S keeps its weight (2.5) while the reference part is
    the unscaled maximum cosine. The official code does not clamp the reference part (the paper does; CLIP
    text-text cosines are positive in practice, so it never matters) and divides 0 by 0 where both parts are
    0; here that case is 0.

    Args:
        clip_scores: (N,) CLIP-S values, from :func:`clip_score`.
        max_ref_sims: (N,) from :func:`max_reference_similarity`.

    Returns:
        (N,) float32 scores.
    """
    if clip_scores.shape != max_ref_sims.shape or clip_scores.ndim != 1:
        raise ValueError(
            f"clip_scores {tuple(clip_scores.shape)} and max_ref_sims {tuple(max_ref_sims.shape)} "
            "must both be (N,)"
        )
    with _float32_math(clip_scores.device):
        image_part = clip_scores.float()
        reference_part = max_ref_sims.float().to(image_part.device).clamp(min=0)
        total = image_part + reference_part
        safe_total = torch.where(total > 0, total, torch.ones_like(total))
        return 2 * image_part * reference_part / safe_total


def ref_compare(
    image_embeds: torch.Tensor,
    candidate_embeds: torch.Tensor,
    reference_embeds: torch.Tensor,
    reference_owner: torch.Tensor,
) -> torch.Tensor:
    """RefCompare (Jin 2023): the fraction of an image's references that CLIP likes less than the candidate.

    A reference counts when its cosine with the image is strictly lower than the candidate's; a tie (e.g.
    a candidate identical to a reference) does not count. Candidate and reference cosines are computed in
    one batched reduction, so identical embeddings give bit-identical cosines and tie exactly.

    Args:
        image_embeds: (N, D) image embeddings.
        candidate_embeds: (N, D) candidate caption embeddings.
        reference_embeds: (M, D) reference caption embeddings.
        reference_owner: (M,) integer: reference ``j`` belongs to image ``reference_owner[j]``.

    Returns:
        (N,) float32 fractions in ``[0, 1]``.
    """
    _check_pairs("image_embeds", image_embeds, "candidate_embeds", candidate_embeds)
    _check_embeds("reference_embeds", reference_embeds)
    if reference_embeds.shape[1] != image_embeds.shape[1]:
        raise ValueError("image_embeds and reference_embeds must have the same embedding size")
    num_images = image_embeds.shape[0]
    device = image_embeds.device
    owner = _check_owner(reference_owner.to(device), num_images, reference_embeds.shape[0])
    with _float32_math(device):
        texts = _unit(torch.cat([candidate_embeds.float(), reference_embeds.float().to(device)]))
        text_owner = torch.cat([torch.arange(num_images, device=device), owner])
        cosines = (_unit(image_embeds)[text_owner] * texts).sum(dim=-1)
        candidate_cosines, reference_cosines = cosines[:num_images], cosines[num_images:]
        lower = (reference_cosines < candidate_cosines[owner]).float()
        counts = torch.bincount(owner, minlength=num_images).float()
        return torch.zeros(num_images, device=device).index_add_(0, owner, lower) / counts


def _strict_hits(similarities: torch.Tensor) -> torch.Tensor:
    """Hits of (..., R, C) similarities whose own candidate is column ``r`` of row ``r``.

    Returns (..., R) bool: the own score is strictly above every other column's (a tie is a miss).
    """
    rows = similarities.shape[-2]
    own = similarities.diagonal(dim1=-2, dim2=-1)
    eye = torch.eye(rows, similarities.shape[-1], dtype=torch.bool, device=similarities.device)
    others = similarities.masked_fill(eye, float("-inf"))
    return own > others.amax(dim=-1)


def retrieval_p_at_1_blocks(
    text_embeds: torch.Tensor, image_embeds: torch.Tensor, block_size: int = 100
) -> tuple[float, int]:
    """Text → image retrieval precision@1 in consecutive blocks (the DiscriTune protocol).

    The images, in the given order (the split's file order, unshuffled), are cut into consecutive blocks of
    ``block_size``; the last partial block is dropped. Within a block, caption ``i`` must retrieve image
    ``i`` among the block's images: a hit only when image ``i``'s cosine is strictly the highest.

    Args:
        text_embeds: (N, D) caption embeddings; caption ``i`` describes image ``i``.
        image_embeds: (N, D) image embeddings.
        block_size: images per block (100 in DiscriTune).

    Returns:
        ``(p_at_1, num_scored)``: the percentage of hits among the ``num_scored`` captions in full blocks.

    Raises:
        ValueError: fewer images than one block.
    """
    _check_pairs("text_embeds", text_embeds, "image_embeds", image_embeds)
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    num_images, dim = image_embeds.shape
    num_blocks = num_images // block_size
    if num_blocks == 0:
        raise ValueError(
            f"retrieval P@1 in blocks of {block_size} images needs at least {block_size} images; "
            f"there are {num_images}"
        )
    num_scored = num_blocks * block_size
    blocks_per_chunk = max(1, _MAX_CHUNK_ELEMENTS // (block_size * block_size))
    hits = 0
    with _float32_math(image_embeds.device):
        texts = _unit(text_embeds[:num_scored]).view(num_blocks, block_size, dim)
        images = _unit(image_embeds[:num_scored]).view(num_blocks, block_size, dim)
        for start in range(0, num_blocks, blocks_per_chunk):
            stop = start + blocks_per_chunk
            similarities = torch.bmm(texts[start:stop], images[start:stop].transpose(1, 2))
            hits += int(_strict_hits(similarities).sum())
    return 100.0 * hits / num_scored, num_scored


def retrieval_p_at_1_random(
    text_embeds: torch.Tensor, image_embeds: torch.Tensor, num_distractors: int = 99, seed: int = 0
) -> float:
    """Text → image precision@1 against randomly drawn distractors.

    Each caption competes with its own image and ``num_distractors`` distinct other images drawn uniformly
    at random (a seeded CPU ``torch.Generator``: the same inputs and seed give the same draws). A hit only
    when the own image's cosine is strictly the highest.

    Args:
        text_embeds: (N, D) caption embeddings; caption ``i`` describes image ``i``.
        image_embeds: (N, D) image embeddings.
        num_distractors: other images per caption.
        seed: seeds the draws.

    Returns:
        The percentage of hits over all N captions.

    Raises:
        ValueError: fewer than ``num_distractors + 1`` images.
    """
    _check_pairs("text_embeds", text_embeds, "image_embeds", image_embeds)
    if num_distractors < 1:
        raise ValueError(f"num_distractors must be at least 1, got {num_distractors}")
    num_images = image_embeds.shape[0]
    if num_images < num_distractors + 1:
        raise ValueError(
            f"retrieval P@1 with {num_distractors} random distractors needs at least {num_distractors + 1} "
            f"images; there are {num_images}"
        )
    generator = torch.Generator().manual_seed(seed)
    rows_per_chunk = max(1, _MAX_CHUNK_ELEMENTS // num_images)
    hits = 0
    device = image_embeds.device
    with _float32_math(device):
        texts, images = _unit(text_embeds), _unit(image_embeds)
        for start in range(0, num_images, rows_per_chunk):
            rows = torch.arange(start, min(start + rows_per_chunk, num_images))
            # The top-k of i.i.d. uniform keys is a uniformly random k-subset of the other N - 1 images;
            # positions at or after the own image shift by one to skip it.
            keys = torch.rand(len(rows), num_images - 1, generator=generator)
            distractors = keys.topk(num_distractors, dim=1).indices
            distractors = (distractors + (distractors >= rows[:, None]).long()).to(device)
            rows = rows.to(device)
            similarities = texts[rows] @ images.T
            own = similarities[torch.arange(len(rows), device=device), rows]
            hits += int((own > similarities.gather(1, distractors).amax(dim=1)).sum())
    return 100.0 * hits / num_images


def retrieval_ranks(text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    """Rank of each caption's own image among all images (text → image), ties counted against it.

    Args:
        text_embeds: (N, D) caption embeddings; caption ``i`` describes image ``i``.
        image_embeds: (N, D) image embeddings.

    Returns:
        (N,) int64 ranks: ``1 +`` the number of OTHER images whose cosine is ``>=`` the own image's.
    """
    _check_pairs("text_embeds", text_embeds, "image_embeds", image_embeds)
    num_images = image_embeds.shape[0]
    device = image_embeds.device
    rows_per_chunk = max(1, _MAX_CHUNK_ELEMENTS // max(num_images, 1))
    ranks = []
    with _float32_math(device):
        texts, images = _unit(text_embeds), _unit(image_embeds)
        for start in range(0, num_images, rows_per_chunk):
            rows = torch.arange(start, min(start + rows_per_chunk, num_images), device=device)
            similarities = texts[rows] @ images.T
            positions = torch.arange(len(rows), device=device)
            own = similarities[positions, rows]
            similarities[positions, rows] = float("-inf")
            ranks.append(1 + (similarities >= own[:, None]).sum(dim=1))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long, device=device)


def retrieval_recall_at_k(
    text_embeds: torch.Tensor, image_embeds: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[int, float]:
    """Text → image recall@K against the full set (see :func:`retrieval_ranks` for the tie rule).

    Args:
        text_embeds: (N, D) caption embeddings; caption ``i`` describes image ``i``.
        image_embeds: (N, D) image embeddings.
        ks: the K values.

    Returns:
        K → percentage of captions whose own image ranks within the top K.
    """
    if any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"recall ks must be positive integers, got {tuple(ks)}")
    if text_embeds.shape[0] == 0:
        raise ValueError("retrieval recall needs at least one image")
    ranks = retrieval_ranks(text_embeds, image_embeds)
    return {int(k): 100.0 * float((ranks <= k).float().mean()) for k in ks}
