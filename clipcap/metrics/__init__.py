"""Caption metrics, usable outside Lightning.

``clip_scores``: CLIP-S, RefCLIP-S, RefCompare and retrieval as pure functions on embeddings.
``nlg``: BLEU, METEOR, ROUGE-L, CIDEr (and SPICE when its jars are present) through pycocoevalcap.
``caption_metrics``: torchmetrics wrappers of both whose states gather across DDP ranks.
"""

from clipcap.metrics.caption_metrics import ClipCaptionScores, NLGScores, first_occurrences
from clipcap.metrics.clip_scores import (
    CLIP_SCORE_WEIGHT,
    clip_score,
    max_reference_similarity,
    paired_cosine,
    ref_clip_score,
    ref_compare,
    retrieval_p_at_1_blocks,
    retrieval_p_at_1_random,
    retrieval_ranks,
    retrieval_recall_at_k,
)
from clipcap.metrics.nlg import (
    DEFAULT_METRICS,
    EMPTY_CAPTION,
    SUPPORTED_METRICS,
    coco_caption_scores,
    sanitize_caption,
    spice_available,
    spice_required_files,
)

__all__ = [
    "CLIP_SCORE_WEIGHT",
    "DEFAULT_METRICS",
    "EMPTY_CAPTION",
    "SUPPORTED_METRICS",
    "ClipCaptionScores",
    "NLGScores",
    "clip_score",
    "coco_caption_scores",
    "first_occurrences",
    "max_reference_similarity",
    "paired_cosine",
    "ref_clip_score",
    "ref_compare",
    "retrieval_p_at_1_blocks",
    "retrieval_p_at_1_random",
    "retrieval_ranks",
    "retrieval_recall_at_k",
    "sanitize_caption",
    "spice_available",
    "spice_required_files",
]
