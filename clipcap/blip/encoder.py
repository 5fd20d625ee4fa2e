"""BLIP's frozen vision encoder, as a feature extractor for the cache (an
:class:`~clipcap.features.encoders.ImageEncoder`, like ``ClipEncoder``).

BLIP's text decoder cross-attends to the vision transformer's whole output sequence,
``vision_model(pixel_values).last_hidden_state``: the [CLS] token and the G patch tokens, through the
final layer norm. That sequence is what the cache's grid holds for BLIP, so its grid has G + 1 rows with
the [CLS] token first, and a BLIP captioner reads exactly what ``BlipForConditionalGeneration`` would feed
its decoder. The pooled slot holds the [CLS] row (``grid[:, 0]``), for the cache's pooled array; it is
not ``BlipVisionModel``'s ``pooler_output``, which applies the final layer norm a second time.

Legend for shapes: B = batch size, S = image side, D = the vision width (768 for BLIP-base),
G = patch tokens ``(S / patch size)²`` (576 at 384 px with 16 px patches).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import BlipVisionModel

from clipcap.blip.checkpoint import BLIP_MODEL_TYPE, load_blip
from clipcap.blip.preprocess import BlipImagePreprocessor
from clipcap.frozen import FrozenEncoder
from clipcap.pretrained import resolve_pretrained

# Hashed by fingerprint(): the ends of the vision tower, which any retraining changes.
_FINGERPRINT_PARAMETERS = (
    "embeddings.class_embedding",
    "embeddings.patch_embedding.weight",
    "embeddings.position_embedding",
    "post_layernorm.weight",
    "post_layernorm.bias",
)


class BlipImageEncoder(FrozenEncoder):
    """BLIP's frozen vision transformer with its preprocessing; features as its decoder sees them.

    Like ``ClipEncoder``, it never trains (no gradients, eval mode whatever its parent's mode) and returns
    float32 features computed under ``torch.no_grad``. It has no text tower: it cannot score captions.

    Args:
        pretrained: a BLIP captioning checkpoint (a Hugging Face name or a local folder).
        dtype: dtype to load the weights in.

    Attributes:
        model: the ``BlipVisionModel``.
        preprocess: the checkpoint's preprocessing (square resize, CLIP normalisation).
    """

    def __init__(self, pretrained: str, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        path = resolve_pretrained(pretrained)
        vision = load_blip(path, dtype=dtype).vision_model
        preprocess = BlipImagePreprocessor.from_pretrained(path, default_image_size=vision.config.image_size)
        self._setup(vision, preprocess, name=pretrained, path=path)

    @classmethod
    def from_model(
        cls, model: BlipVisionModel, preprocess: BlipImagePreprocessor | None = None, name: str = "custom"
    ) -> BlipImageEncoder:
        """Wraps an in-memory vision model (tests); BLIP's default preprocessing at its size if None."""
        encoder = cls._bare()
        preprocess = preprocess or BlipImagePreprocessor(image_size=model.config.image_size)
        encoder._setup(model, preprocess, name=name, path=name)
        return encoder

    def _setup(self, model: BlipVisionModel, preprocess: BlipImagePreprocessor, name: str, path: str) -> None:
        self._hold(model, preprocess, name, path)
        if preprocess.image_size != model.config.image_size:
            raise ValueError(
                f"BLIP {name!r}: its preprocessing resizes to {preprocess.image_size} px but the vision "
                f"encoder takes {model.config.image_size} px images"
            )

    @property
    def dim(self) -> int:
        """D, the vision width: the size of every row the decoder cross-attends to."""
        return int(self.model.config.hidden_size)

    @property
    def grid_size(self) -> int:
        """G + 1: the patch tokens and the [CLS] token (first)."""
        config = self.model.config
        return int((config.image_size // config.patch_size) ** 2 + 1)

    @property
    def device(self) -> torch.device:
        return self.model.post_layernorm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.post_layernorm.weight.dtype

    @torch.no_grad()
    def encode_images_and_grid(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The [CLS] features and the whole output sequence, from one forward pass.

        Args:
            pixel_values: (B, 3, S, S) preprocessed images.

        Returns:
            ``(pooled, grid)``: (B, D) the [CLS] row, and (B, G + 1, D) the sequence BLIP's decoder
            cross-attends to ([CLS] first), float32.
        """
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        sequence = self.model(pixel_values=pixel_values).last_hidden_state.float()
        return sequence[:, 0], sequence

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, D) the [CLS] row of :meth:`encode_images_and_grid`."""
        return self.encode_images_and_grid(pixel_values)[0]

    def encode_image_grid(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, G + 1, D), the decoder's ``encoder_hidden_states``."""
        return self.encode_images_and_grid(pixel_values)[1]

    def fingerprint(self) -> dict[str, Any]:
        """A JSON-ready description of this vision encoder, recorded in feature caches to refuse mismatches
        (``model_type`` keeps it apart from every CLIP's)."""
        config = self.model.config
        sha1 = self._weights_sha1(_FINGERPRINT_PARAMETERS)
        return {
            "name": self._name,
            "path": self._path,
            "model_type": BLIP_MODEL_TYPE,
            "features": "vision_last_hidden_state",
            "image_size": int(config.image_size),
            "patch_size": int(config.patch_size),
            "vision_hidden_size": int(config.hidden_size),
            "vision_layers": int(config.num_hidden_layers),
            "vision_weights_sha1": sha1,
        }
