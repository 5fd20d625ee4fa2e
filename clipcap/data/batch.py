"""The batch every objective and callback reads.

Shapes: B images in the batch, D_clip CLIP feature size, G grid tokens (grid features only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class CaptionBatch:
    """A batch of images with their CLIP features and captions.

    Attributes:
        image_ids: B image ids.
        clip_features: (B, D_clip) pooled or (B, G, D_clip) grid CLIP features.
        captions: B target captions (one per row) for objectives trained on references; None for
            unlabelled images.
        references: B lists of all reference captions of each image (empty lists when unlabelled).
        anchor: labelled (image, reference) pairs served beside an unlabelled batch
            (``data.init_args.anchor_batch_size``), for an objective's supervised anchor; None otherwise.
    """

    image_ids: list[str]
    clip_features: torch.Tensor
    captions: list[str] | None = None
    references: list[list[str]] = field(default_factory=list)
    anchor: CaptionBatch | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def pin_memory(self) -> CaptionBatch:
        """The batch with its features in page-locked host memory, so that the copy to the GPU can overlap
        compute. A ``DataLoader(pin_memory=True)`` calls this; without it, torch passes a dataclass through
        unpinned and the configs' ``pin_memory: true`` would do nothing."""
        anchor = self.anchor.pin_memory() if self.anchor is not None else None
        return dataclasses.replace(self, clip_features=self.clip_features.pin_memory(), anchor=anchor)

    def with_every_reference(self) -> CaptionBatch:
        """One row per (image, reference) pair: how validation scores a teacher-forced loss."""
        rows = [(i, caption) for i, refs in enumerate(self.references) for caption in refs]
        if not rows:
            raise ValueError("with_every_reference: the batch has no reference captions")
        index = torch.tensor([i for i, _ in rows], device=self.clip_features.device)
        return CaptionBatch(
            image_ids=[self.image_ids[i] for i, _ in rows],
            clip_features=self.clip_features.index_select(0, index),
            captions=[caption for _, caption in rows],
            references=[self.references[i] for i, _ in rows],
        )


@dataclass
class CaptionSample:
    """One dataset item: an image's features, the caption chosen for this item, all its references."""

    image_id: str
    clip_features: np.ndarray
    caption: str | None
    references: list[str]


def collate_caption_batch(samples: list[CaptionSample]) -> CaptionBatch:
    """Stacks samples into a ``CaptionBatch`` (features copied out of the memory map once, here)."""
    features = torch.from_numpy(np.stack([np.asarray(s.clip_features, dtype=np.float32) for s in samples]))
    captions = [s.caption for s in samples]
    return CaptionBatch(
        image_ids=[s.image_id for s in samples],
        clip_features=features,
        captions=None if any(c is None for c in captions) else captions,
        references=[list(s.references) for s in samples],
    )
