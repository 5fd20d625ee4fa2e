"""CLIP image preprocessing with PIL and NumPy, matching ``transformers.CLIPImageProcessor`` numerically.

There is no torchvision here, so we do what ``CLIPImageProcessorPil`` does step for step: RGB conversion
(transparency composited onto white), bicubic resize of the short side with PIL, center crop (zero
padding when the image is smaller than the crop), scaling to [0, 1] and normalisation with CLIP's
mean and std. Each step keeps the reference's dtypes and rounding so that the pixels agree exactly.

Legend for shapes: B = batch size, S = crop size (the CLIP vision input size).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from PIL import Image
from transformers.utils import cached_file

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_CONFIG = "preprocessor_config.json"


P = TypeVar("P", bound="PixelPreprocessor")


class PixelPreprocessor:
    """What CLIP's and BLIP's preprocessors share: saving their config, normalising, batching.

    Subclasses are frozen dataclasses with ``image_size``, ``mean`` and ``std``; they set ``FAMILY`` and
    ``DEFAULT_SIZE`` and define ``at_size``, ``from_config_dict``, ``to_dict``, ``to_hf_config`` and
    ``resized``.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        # Lists from JSON become tuples so that instances compare and hash by value.
        object.__setattr__(self, "mean", tuple(float(value) for value in self.mean))
        object.__setattr__(self, "std", tuple(float(value) for value in self.std))
        object.__setattr__(self, "resample", int(self.resample))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {self.mean} and {self.std}")
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")

    FAMILY: ClassVar[str]
    """Whose preprocessing it is, in messages."""
    DEFAULT_SIZE: ClassVar[int]
    """The image size when neither a config nor the caller gives one."""

    @classmethod
    def at_size(cls: type[P], size: int) -> P:
        """The family's default preprocessing at ``size`` px."""
        raise NotImplementedError

    @classmethod
    def from_config_dict(cls: type[P], config: dict[str, Any], source: str = "config") -> P:
        """Builds a preprocessor from the contents of a Hugging Face ``preprocessor_config.json``."""
        raise NotImplementedError

    @classmethod
    def from_pretrained(
        cls: type[P], folder_or_name: str | os.PathLike[str], default_image_size: int | None = None
    ) -> P:
        """Reads ``preprocessor_config.json`` from a model folder or Hugging Face name.

        Args:
            folder_or_name: local folder, or a Hugging Face name (looked up through the HF cache).
            default_image_size: the size to use when there is no preprocessor config, e.g. the vision
                model's ``image_size``; ``DEFAULT_SIZE`` (CLIP's 224, BLIP's 384) if None.

        Returns:
            The preprocessor the config describes, or the family's default at that size if there is none.

        Raises:
            ValueError: the config asks for something this class does not implement (for CLIP, a
                non-square crop or a resize to a fixed height and width; for BLIP, anything but a square
                resize).
        """
        size = default_image_size or cls.DEFAULT_SIZE
        config = cls._read_config(folder_or_name, cls.FAMILY, size)
        if config is None:
            return cls.at_size(size)
        return cls.from_config_dict(config, source=config.pop("_source"))

    @classmethod
    def _read_config(
        cls, folder_or_name: str | os.PathLike[str], family: str, default_size: int
    ) -> dict[str, Any] | None:
        """The folder's ``preprocessor_config.json`` with its path under ``"_source"``, or None (and a
        warning that ``family``'s default preprocessing at ``default_size`` px is used)."""
        config_path = find_preprocessor_config(folder_or_name)
        if config_path is None:
            logger.warning(
                "%s has no %s; using %s's default preprocessing at %d px",
                folder_or_name,
                PREPROCESSOR_CONFIG,
                family,
                default_size,
            )
            return None
        with open(config_path, encoding="utf-8") as handle:
            return {**json.load(handle), "_source": str(config_path)}

    @classmethod
    def _shared_options(
        cls, config: dict[str, Any], source: str, family: str, steps: tuple[str, ...]
    ) -> dict[str, Any]:
        """Checks the steps every preprocessing here performs (``steps`` may not be switched off, the
        rescale must be 1/255) and returns the normalisation and resampling options of ``config``.

        Args:
            config: a parsed ``preprocessor_config.json``.
            source: where it came from, for error messages.
            family: ``CLIP`` or ``BLIP``, for error messages.
            steps: the ``do_*`` flags this preprocessing always performs.
        """
        for flag in steps:
            if config.get(flag, True) is False:
                raise ValueError(f"{source}: {flag}=false is not supported; {family} preprocessing does it")
        rescale_factor = config.get("rescale_factor", 1 / 255)
        if not np.isclose(rescale_factor, 1 / 255):
            raise ValueError(f"{source}: rescale_factor {rescale_factor} is not 1/255")
        defaults = cls()
        return {
            "mean": tuple(config.get("image_mean", defaults.mean)),
            "std": tuple(config.get("image_std", defaults.std)),
            "resample": int(config.get("resample", defaults.resample)),
        }

    def to_hf_config(self) -> dict[str, Any]:
        raise NotImplementedError

    def preprocess_image(self, image: Image.Image) -> np.ndarray:
        """Preprocesses one image.

        Args:
            image: any PIL image (RGB, RGBA, L, P, ...).

        Returns:
            (3, S, S) float32 normalised pixels.
        """
        return self.normalise(self.resized(convert_to_rgb(image)))

    def resized(self, rgb: Image.Image) -> np.ndarray:
        """(S, S, 3) uint8 pixels of an RGB image, resized (and cropped) as the image processor does."""
        raise NotImplementedError

    def save_pretrained(self, folder: str | os.PathLike[str]) -> Path:
        """Writes :meth:`to_hf_config` as ``folder/preprocessor_config.json`` and returns its path."""
        path = Path(folder) / PREPROCESSOR_CONFIG
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_hf_config(), indent=2) + "\n", encoding="utf-8")
        return path

    def _recorded_normalisation(self) -> dict[str, Any]:
        """What every preprocessing records in a cache besides its resizing: mean, std, resampling."""
        return {"mean": list(self.mean), "std": list(self.std), "resample": self.resample}

    def _hf_rescale_and_normalise(self) -> dict[str, Any]:
        """The ``preprocessor_config.json`` keys every image processor shares: RGB, rescale, normalise."""
        return {
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_convert_rgb": True,
        }

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """(S, S, 3) uint8 pixels → (3, S, S) float32: scaled to [0, 1] in float64 and cast, then
        normalised in float32, as transformers' rescale and normalize do, so results are bit-identical
        rather than merely close."""
        scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        normalised = (scaled - mean) / std
        return np.ascontiguousarray(normalised.transpose(2, 0, 1))

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Preprocesses a batch of images.

        Args:
            images: B PIL images of any size and mode.

        Returns:
            (B, 3, S, S) float32 pixel values for the vision model.
        """
        if isinstance(images, Image.Image):
            raise TypeError(f"{type(self).__name__} expects a list of images, not a single image")
        if not images:
            return torch.empty((0, 3, self.image_size, self.image_size), dtype=torch.float32)
        return torch.from_numpy(np.stack([self.preprocess_image(image) for image in images]))


@dataclasses.dataclass(frozen=True)
class ClipImagePreprocessor(PixelPreprocessor):
    """Turns PIL images into CLIP's normalised pixel tensors.

    Frozen (immutable and hashable) because its :meth:`to_dict` is recorded in feature caches and
    must describe the preprocessing that actually ran.
    """

    image_size: int = 224
    """Side of the square center crop fed to the vision encoder."""
    resize_shortest_edge: int = 224
    """The short side of the image is resized to this before cropping."""
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    """Per-channel mean subtracted after scaling to [0, 1]."""
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    """Per-channel standard deviation divided out after subtracting the mean."""
    resample: int = int(Image.Resampling.BICUBIC)
    """PIL resampling filter of the resize (3 = bicubic, as CLIP was trained)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resize_shortest_edge <= 0:
            raise ValueError(f"resize_shortest_edge must be positive, got {self.resize_shortest_edge}")

    FAMILY: ClassVar[str] = "CLIP"
    DEFAULT_SIZE: ClassVar[int] = 224

    @classmethod
    def at_size(cls, size: int) -> ClipImagePreprocessor:
        """CLIP's default preprocessing at ``size``: resize the short side to it, centre-crop a square."""
        return cls(image_size=size, resize_shortest_edge=size)

    @classmethod
    def from_config_dict(cls, config: dict[str, Any], source: str = "config") -> ClipImagePreprocessor:
        """Builds a preprocessor from the contents of a Hugging Face ``preprocessor_config.json``.

        Args:
            config: the parsed JSON.
            source: where it came from, for error messages.
        """
        defaults = cls()
        size = config.get("size", {"shortest_edge": defaults.resize_shortest_edge})
        if isinstance(size, int):  # very old configs store a bare int
            size = {"shortest_edge": size}
        if "shortest_edge" not in size:
            raise ValueError(f"{source}: size {size} is not a shortest-edge resize, which CLIP uses")
        crop = config.get("crop_size", {"height": defaults.image_size, "width": defaults.image_size})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if crop["height"] != crop["width"]:
            raise ValueError(f"{source}: crop_size {crop} is not square")
        steps = ("do_resize", "do_center_crop", "do_rescale", "do_normalize")
        return cls(
            image_size=int(crop["height"]),
            resize_shortest_edge=int(size["shortest_edge"]),
            **cls._shared_options(config, source, "CLIP", steps),
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, recorded in feature caches and compared when they are opened."""
        return {
            "image_size": self.image_size,
            "resize_shortest_edge": self.resize_shortest_edge,
            **self._recorded_normalisation(),
        }

    def to_hf_config(self) -> dict[str, Any]:
        """The same settings as a ``preprocessor_config.json`` that ``CLIPImageProcessor`` reads."""
        return {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": self.resize_shortest_edge},
            "resample": self.resample,
            "do_center_crop": True,
            "crop_size": {"height": self.image_size, "width": self.image_size},
            **self._hf_rescale_and_normalise(),
        }

    def resized_pixels(self, width: int, height: int) -> int:
        """Pixels of an image of this size once its short side is resized (before the crop): extraction
        refuses images whose resize would exceed its pixel limit (a 1x20000 strip would become
        224x4,480,000)."""
        short, long = sorted((width, height))
        return self.resize_shortest_edge * int(self.resize_shortest_edge * long / short)

    def resized(self, rgb: Image.Image) -> np.ndarray:
        width, height = rgb.size
        # Same size rule as transformers' get_resize_output_image_size: the long side is truncated,
        # not rounded, so e.g. 640x427 -> 335x224 rather than 336x224.
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize_shortest_edge, int(self.resize_shortest_edge * long / short)
        new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
        if (new_width, new_height) != (width, height):
            rgb = rgb.resize((new_width, new_height), resample=self.resample)
        return _center_crop(np.asarray(rgb), self.image_size)


def find_preprocessor_config(folder_or_name: str | os.PathLike[str]) -> Path | None:
    """Path of ``preprocessor_config.json`` for a folder or HF name, or None if there is none."""
    folder = Path(folder_or_name)
    if folder.is_dir():
        path = folder / PREPROCESSOR_CONFIG
        return path if path.is_file() else None
    try:
        # Offline this only finds what the HF cache already holds; a missing file is not an error.
        found = cached_file(
            str(folder_or_name),
            PREPROCESSOR_CONFIG,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except OSError:
        return None
    return Path(found) if found else None


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of ``image``, compositing transparency onto white.

    Matches ``transformers.image_transforms.convert_to_rgb``. (openai's own preprocessing calls
    ``image.convert("RGB")``, which drops alpha and exposes whatever colour transparent pixels hold;
    we follow transformers, whose processor ships with every HF CLIP checkpoint.)
    """
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """Center crop of an (H, W, 3) array to (size, size, 3), zero-padding an image that is too small.

    The offsets are ``(H - size) // 2`` and, when padding, ``ceil((size - H) / 2)``, as in
    ``transformers.image_transforms.center_crop``.
    """
    height, width = pixels.shape[:2]
    top = (height - size) // 2
    left = (width - size) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + size, left : left + size]
    padded_height, padded_width = max(size, height), max(size, width)
    padded = np.zeros((padded_height, padded_width, pixels.shape[2]), dtype=pixels.dtype)
    pad_top = -(-(padded_height - height) // 2)
    pad_left = -(-(padded_width - width) // 2)
    padded[pad_top : pad_top + height, pad_left : pad_left + width] = pixels
    top += pad_top
    left += pad_left
    return padded[max(0, top) : top + size, max(0, left) : left + size]
