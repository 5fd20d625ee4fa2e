"""A frozen CLIP (``transformers.CLIPModel``) with the tokenizer and preprocessing that belong to it.

Legend for shapes: B = batch size, S = image crop size, L = token length, D = CLIP projection dimension,
G = number of image patches (grid tokens), ``(S / patch size)²``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import CLIPModel

from clipcap.clip.preprocess import ClipImagePreprocessor
from clipcap.clip.tokenizer import CONTEXT_LENGTH, ClipTokenizer, load_clip_tokenizer
from clipcap.frozen import FrozenEncoder
from clipcap.pretrained import checkpoint_model_type, resolve_pretrained

# Parameters hashed by ClipEncoder.fingerprint: the ends of the vision tower and its projection. Any
# retraining or fine-tuning changes them, and together they are small enough to hash in milliseconds
# even for ViT-L.
_FINGERPRINT_PARAMETERS = (
    "vision_model.embeddings.class_embedding",
    "vision_model.embeddings.patch_embedding.weight",
    "vision_model.embeddings.position_embedding.weight",
    "vision_model.pre_layrnorm.weight",
    "vision_model.post_layernorm.weight",
    "vision_model.post_layernorm.bias",
    "visual_projection.weight",
)


class ClipEncoder(FrozenEncoder):
    """Frozen CLIP image and text encoders returning projected (not normalised) embeddings.

    The model never trains: its parameters do not require gradients and :meth:`train` keeps it in eval
    mode even when a parent module is put in training mode. Embeddings are computed under
    ``torch.no_grad`` (not ``inference_mode``: inference tensors could not be used later as constants in
    a loss that does require gradients) and returned as float32 whatever the model's dtype.

    Args:
        pretrained: Hugging Face name, local folder or ``synthetic:clip``.
        dtype: dtype to load the weights in.

    Attributes:
        model: the wrapped ``CLIPModel`` (for callers that need its submodules, e.g. soft-token text
            encoding).
        tokenizer: openai CLIP's tokenizer.
        preprocess: the image preprocessing the checkpoint was trained with.
    """

    def __init__(self, pretrained: str, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        path = resolve_pretrained(pretrained)
        model_type = checkpoint_model_type(path)
        if model_type not in (None, "clip"):
            # Without this, CLIPModel.from_pretrained prints a long weight report and then fails obscurely.
            raise ValueError(
                f"{pretrained!r} is a {model_type!r} checkpoint, not a CLIP: only a CLIP reads captions. "
                "When the data's features come from another image encoder (a BLIP captioner's), name a "
                "CLIP, with its own feature caches, wherever captions are read: DiscriTune's receiver_clip "
                "and receiver_features_dir, CaptionEvaluation's scoring_clip and scoring_features_dir "
                "(see docs/blip.md)"
            )
        model = CLIPModel.from_pretrained(path, dtype=dtype)
        preprocess = ClipImagePreprocessor.from_pretrained(
            path, default_image_size=model.config.vision_config.image_size
        )
        self._setup(model, preprocess, name=pretrained, path=path)

    @classmethod
    def from_model(
        cls,
        model: CLIPModel,
        preprocess: ClipImagePreprocessor | None = None,
        name: str = "custom",
    ) -> ClipEncoder:
        """Wraps an in-memory ``CLIPModel`` (tests, freshly trained models).

        Args:
            model: the CLIP model; it is frozen in place.
            preprocess: its preprocessing; CLIP's defaults at the model's image size if None.
            name: recorded in :meth:`fingerprint`.
        """
        encoder = cls._bare()
        if preprocess is None:
            size = model.config.vision_config.image_size
            preprocess = ClipImagePreprocessor(image_size=size, resize_shortest_edge=size)
        encoder._setup(model, preprocess, name=name, path=name)
        return encoder

    def _setup(self, model: CLIPModel, preprocess: ClipImagePreprocessor, name: str, path: str) -> None:
        self._hold(model, preprocess, name, path)
        self.tokenizer: ClipTokenizer = load_clip_tokenizer()
        vision_size = model.config.vision_config.image_size
        if preprocess.image_size != vision_size:
            raise ValueError(
                f"CLIP {name!r}: its preprocessing crops to {preprocess.image_size} px but the vision "
                f"encoder takes {vision_size} px images"
            )
        text_vocab = model.config.text_config.vocab_size
        if text_vocab < self.tokenizer.vocab_size:
            raise ValueError(
                f"CLIP {name!r}: its text encoder has {text_vocab} token embeddings, fewer than the "
                f"{self.tokenizer.vocab_size} of openai CLIP's BPE vocabulary that ClipEncoder tokenizes with"
            )
        self.context_length = min(CONTEXT_LENGTH, model.config.text_config.max_position_embeddings)

    @property
    def dim(self) -> int:
        """D, the size of the projected image and text embeddings."""
        return int(self.model.config.projection_dim)

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature, ``exp`` of the model's ``logit_scale`` parameter (100 for openai)."""
        return float(self.model.logit_scale.detach().float().exp())

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual_projection.weight.dtype

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings.

        Args:
            pixel_values: (B, 3, S, S) preprocessed images, e.g. from :attr:`preprocess`.

        Returns:
            (B, D) float32 embeddings, not normalised.
        """
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        output = self.model.get_image_features(pixel_values=pixel_values)
        return output.pooler_output.float()

    @property
    def grid_size(self) -> int:
        """G, the number of patch tokens of :meth:`encode_image_grid` (``(S / patch size)²``)."""
        vision = self.model.config.vision_config
        return int((vision.image_size // vision.patch_size) ** 2)

    @torch.no_grad()
    def encode_images_and_grid(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled embeddings and grid features from one forward pass of the vision transformer.

        The pooled embedding is exactly :meth:`encode_images`' (``get_image_features``: the CLS token
        through ``post_layernorm`` and ``visual_projection``). The grid features are the patch tokens of
        the last layer (``last_hidden_state`` without the CLS token) through the same ``post_layernorm``
        and ``visual_projection``, so they live in the pooled embedding's D-dim space (CLIP-ViL-style grid
        features, a prefix source for the Transformer mapper).

        Args:
            pixel_values: (B, 3, S, S) preprocessed images.

        Returns:
            ``(pooled, grid)``: (B, D) and (B, G, D) float32, not normalised.
        """
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        vision = self.model.vision_model(pixel_values=pixel_values, return_dict=True)
        pooled = self.model.visual_projection(vision.pooler_output)
        patches = self.model.vision_model.post_layernorm(vision.last_hidden_state[:, 1:, :])
        grid = self.model.visual_projection(patches)
        return pooled.float(), grid.float()

    def encode_image_grid(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Grid features: projected patch tokens (see :meth:`encode_images_and_grid`).

        Args:
            pixel_values: (B, 3, S, S) preprocessed images.

        Returns:
            (B, G, D) float32, not normalised.
        """
        return self.encode_images_and_grid(pixel_values)[1]

    def encode_pil(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Projected embeddings of PIL images (preprocessed with :attr:`preprocess`).

        Args:
            images: B images of any size and mode.

        Returns:
            (B, D) float32 embeddings, not normalised.
        """
        return self.encode_images(self.preprocess(images))

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Projected text embeddings, pooled at each row's EOT token.

        Texts longer than the context length are truncated as ``clip.tokenize(truncate=True)`` does.
        Pooling uses the tokenizer's EOT positions rather than ``CLIPTextModel``'s own rule, which
        depends on ``config.eos_token_id`` (argmax of the ids when it is the legacy value 2, else the
        first occurrence of that id) and so silently pools elsewhere for a misconfigured checkpoint.

        Args:
            texts: B captions.

        Returns:
            (B, D) float32 embeddings, not normalised.
        """
        batch = self.tokenizer(list(texts), context_length=self.context_length, truncate=True)
        input_ids = batch["input_ids"].to(self.device)
        attention_mask = batch["attention_mask"].to(self.device)
        hidden = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=self.device)
        pooled = hidden[rows, batch["eot_positions"].to(self.device)]
        return self.model.text_projection(pooled).float()

    def fingerprint(self) -> dict[str, Any]:
        """A JSON-ready description of this CLIP, recorded in feature caches to refuse mismatches.

        ``name`` and ``path`` say where the model came from (for people reading the cache); the config
        sizes and ``vision_weights_sha1`` identify the image encoder, so a different CLIP with the same
        architecture is told apart. The hash is over the listed parameters as loaded, cast to float32.
        """
        vision = self.model.config.vision_config
        text = self.model.config.text_config
        sha1 = self._weights_sha1(_FINGERPRINT_PARAMETERS, skip_missing=True)
        return {
            "name": self._name,
            "path": self._path,
            "projection_dim": int(self.model.config.projection_dim),
            "image_size": int(vision.image_size),
            "patch_size": int(vision.patch_size),
            "vision_hidden_size": int(vision.hidden_size),
            "vision_layers": int(vision.num_hidden_layers),
            "text_hidden_size": int(text.hidden_size),
            "vision_weights_sha1": sha1,
        }
