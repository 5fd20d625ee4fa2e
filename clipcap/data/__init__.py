"""Data records and batches shared by the core and the Lightning layer."""

from clipcap.data.batch import CaptionBatch, collate_caption_batch

__all__ = ["CaptionBatch", "collate_caption_batch"]
