"""Caption metrics, usable outside Lightning."""

from clipcap.metrics.nlg import coco_caption_scores

__all__ = ["coco_caption_scores"]
