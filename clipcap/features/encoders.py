"""The frozen image encoders whose features are cached: what extraction needs of one, and how one is chosen.

Two implement :class:`ImageEncoder`: :class:`clipcap.clip.encoder.ClipEncoder` (a CLIP, pooled embedding and
projected patch tokens) and :class:`clipcap.blip.encoder.BlipImageEncoder` (BLIP's vision transformer, whose
whole output sequence its text decoder cross-attends to). :func:`load_image_encoder` picks one by the
checkpoint's ``model_type``, so ``data.init_args.clip_model`` may name either.

Legend for shapes: B = batch size, S = input image side, D = feature size, G = grid rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from clipcap.blip.encoder import BlipImageEncoder
from clipcap.clip.encoder import ClipEncoder
from clipcap.pretrained import checkpoint_model_type


class ImagePreprocessor(Protocol):
    """PIL images → the encoder's normalised pixels; frozen, picklable (it runs in DataLoader workers)."""

    image_size: int
    """The side S of the square pixel input."""

    def resized_pixels(self, width: int, height: int) -> int:
        """Pixels of a ``width`` × ``height`` image after its resize (checked against the pixel limit)."""
        ...

    def preprocess_image(self, image: Image.Image) -> np.ndarray:
        """One image → (3, S, S) float32."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, recorded in feature caches."""
        ...

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """B images → (B, 3, S, S) float32."""
        ...


class ImageEncoder(Protocol):
    """What ``clipcap features`` (:func:`clipcap.features.extract.extract_entries`) and the feature caches'
    provenance checks use of a frozen image encoder."""

    preprocess: ImagePreprocessor

    @property
    def name(self) -> str:
        """The name it was loaded from."""
        ...

    @property
    def dim(self) -> int:
        """D, the size of the pooled and grid features."""
        ...

    @property
    def grid_size(self) -> int:
        """G, the rows of the grid features."""
        ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def fingerprint(self) -> dict[str, Any]:
        """A JSON-ready identity of the weights, recorded in caches to refuse mismatches."""
        ...

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, D) float32 pooled features."""
        ...

    def encode_images_and_grid(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) → (B, D) pooled and (B, G, D) grid features, float32, from one forward pass."""
        ...

    def to(self, *args: Any, **kwargs: Any) -> Any: ...


def load_image_encoder(name: str) -> ImageEncoder:
    """The frozen image encoder of a checkpoint: a ``BlipImageEncoder`` for a BLIP checkpoint
    (``model_type`` ``blip``), else a ``ClipEncoder``.

    Args:
        name: a Hugging Face name, a local folder, or ``synthetic:<part>``.
    """
    if checkpoint_model_type(name) == "blip":
        return BlipImageEncoder(name)

    return ClipEncoder(name)
