"""BLIP image preprocessing with PIL and NumPy, matching ``transformers.BlipImageProcessorPil`` numerically.

BLIP resizes the whole image to a square (no aspect-preserving resize, no crop) with bicubic PIL
resampling, then scales to [0, 1] and normalises with openai CLIP's mean and std. The steps keep the
reference's dtypes and rounding (as :mod:`clipcap.clip.preprocess` does for CLIP), so pixels agree exactly.

Legend for shapes: B = batch size, S = the square side (the BLIP vision input size, 384 for the released
captioning checkpoints).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from clipcap.clip.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PixelPreprocessor,
)


@dataclasses.dataclass(frozen=True)
class BlipImagePreprocessor(PixelPreprocessor):
    """Turns PIL images into BLIP's normalised pixel tensors.

    Frozen because its :meth:`to_dict` is recorded in feature caches and must describe what ran. The
    interface is :class:`clipcap.clip.preprocess.ClipImagePreprocessor`'s, which feature extraction uses.
    """

    image_size: int = 384
    """Side of the square every image is resized to (S)."""
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    """Per-channel mean subtracted after scaling to [0, 1]."""
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    """Per-channel standard deviation divided out after subtracting the mean."""
    resample: int = int(Image.Resampling.BICUBIC)
    """PIL resampling filter of the resize (3 = bicubic, BLIP's)."""

    FAMILY: ClassVar[str] = "BLIP"
    DEFAULT_SIZE: ClassVar[int] = 384

    @classmethod
    def at_size(cls, size: int) -> BlipImagePreprocessor:
        """BLIP's default preprocessing: a square resize to ``size``."""
        return cls(image_size=size)

    @classmethod
    def from_config_dict(cls, config: dict[str, Any], source: str = "config") -> BlipImagePreprocessor:
        """Builds a preprocessor from the contents of a Hugging Face ``preprocessor_config.json``."""
        defaults = cls()
        size = config.get("size", {"height": defaults.image_size, "width": defaults.image_size})
        if isinstance(size, int):
            size = {"height": size, "width": size}
        if "height" not in size or "width" not in size or size["height"] != size["width"]:
            raise ValueError(f"{source}: size {size} is not the square resize BLIP uses")
        if config.get("do_center_crop", False):
            raise ValueError(f"{source}: do_center_crop=true is not BLIP's preprocessing")
        steps = ("do_resize", "do_rescale", "do_normalize")
        return cls(image_size=int(size["height"]), **cls._shared_options(config, source, "BLIP", steps))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, recorded in feature caches and compared when they are opened."""
        return {"resize": "square", "image_size": self.image_size, **self._recorded_normalisation()}

    def to_hf_config(self) -> dict[str, Any]:
        """The same settings as a ``preprocessor_config.json`` that ``BlipImageProcessor`` reads."""
        return {
            "image_processor_type": "BlipImageProcessor",
            "do_resize": True,
            "size": {"height": self.image_size, "width": self.image_size},
            "resample": self.resample,
            **self._hf_rescale_and_normalise(),
        }

    def resized_pixels(self, width: int, height: int) -> int:
        """Pixels of an image of this size once resized (S², whatever its shape): extraction refuses
        images whose resize would exceed its pixel limit."""
        return self.image_size * self.image_size

    def resized(self, rgb: Image.Image) -> np.ndarray:
        size = (self.image_size, self.image_size)
        if rgb.size != size:
            rgb = rgb.resize(size, resample=self.resample)
        return np.asarray(rgb)
