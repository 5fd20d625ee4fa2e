"""Loading a BLIP captioning checkpoint (``BlipForConditionalGeneration``) for one of its two halves."""

from __future__ import annotations

import torch
from transformers import BlipForConditionalGeneration

from clipcap.pretrained import checkpoint_model_type, resolve_pretrained

BLIP_MODEL_TYPE = "blip"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_blip(pretrained: str, dtype: torch.dtype = torch.float32) -> BlipForConditionalGeneration:
    """The whole BLIP captioning model; callers keep the half they need (the vision encoder or the text
    decoder) and let the other go.

    The whole model is loaded rather than one half through a key mapping because the composite class is
    what ties the decoder's input and output embeddings and reports a missing weight, exactly as for the
    released checkpoints.

    Args:
        pretrained: a Hugging Face name (``Salesforce/blip-image-captioning-base``) or a local folder.
        dtype: the weights' dtype.

    Raises:
        ValueError: the checkpoint is not a BLIP one, or cannot be loaded.
    """
    path = resolve_pretrained(pretrained)
    model_type = checkpoint_model_type(path)
    if model_type is not None and model_type != BLIP_MODEL_TYPE:
        raise ValueError(
            f"{pretrained!r} is a {model_type!r} checkpoint, not a BLIP captioning one "
            "(BlipForConditionalGeneration, e.g. Salesforce/blip-image-captioning-base)"
        )
    try:
        return BlipForConditionalGeneration.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load a BLIP captioning model from {pretrained!r}: {error}") from error
