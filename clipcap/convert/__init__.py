"""The checkpoints of the original projects, read into clipcap's formats (``clipcap convert``).

::

    clipcap convert clipcap    --checkpoint coco_weights.pt   --out converted/coco [--lm gpt2] [--n_head 12]
    clipcap convert discritune --checkpoint clip_clap_model_final.pt --out converted/dt [--lm gpt2]
    clipcap convert clip       --checkpoint ViT-B-32.pt       --out converted/clip-vit-b-32

``model.init_from`` also takes an original ClipCap or DiscriTune ``.pt`` directly (see
:func:`~clipcap.convert.captioner.load_original_captioner_weights`).

The layouts read are described where they are read: :mod:`clipcap.convert.captioner` (ClipCap and
DiscriTune) and :mod:`clipcap.convert.openai_clip` (OpenAI CLIP); :mod:`clipcap.convert.weights` has what
both use (the state dict inside a file, checks of names and shapes).

``clipcap convert`` reads files with ``torch.load(weights_only=True)`` (no pickled code runs), except
TorchScript archives, which only ``torch.jit.load`` reads.
"""

from __future__ import annotations

from clipcap.convert.captioner import (
    CLIPCAP_LM_PREFIX,
    CLIPCAP_MAPPER_PREFIX,
    CLIPCAP_TRANSFORMER_HEADS,
    CONVERTED_CHECKPOINT,
    CONVERTED_LM,
    CONVERTED_MAPPER,
    CONVERTED_MODEL_CONFIG,
    DISCRITUNE_PREFIX,
    MapperWeights,
    OriginalCaptioner,
    captioner_config,
    clipcap_mapper_weights,
    convert_clipcap,
    convert_discritune,
    find_clipcap_prefix,
    gpt2_config,
    gpt2_weights,
    load_converted_mapper,
    load_original_captioner_weights,
    model_config_overlay,
    original_captioner,
    read_original_captioner,
    write_converted_captioner,
)
from clipcap.convert.openai_clip import (
    convert_openai_clip,
    openai_clip_config,
    openai_clip_key_map,
    openai_clip_to_hf,
)

__all__ = [
    "CLIPCAP_LM_PREFIX",
    "CLIPCAP_MAPPER_PREFIX",
    "CLIPCAP_TRANSFORMER_HEADS",
    "CONVERTED_CHECKPOINT",
    "CONVERTED_LM",
    "CONVERTED_MAPPER",
    "CONVERTED_MODEL_CONFIG",
    "DISCRITUNE_PREFIX",
    "MapperWeights",
    "OriginalCaptioner",
    "captioner_config",
    "clipcap_mapper_weights",
    "convert_clipcap",
    "convert_discritune",
    "convert_openai_clip",
    "find_clipcap_prefix",
    "gpt2_config",
    "gpt2_weights",
    "load_converted_mapper",
    "load_original_captioner_weights",
    "model_config_overlay",
    "openai_clip_config",
    "openai_clip_key_map",
    "openai_clip_to_hf",
    "original_captioner",
    "read_original_captioner",
    "write_converted_captioner",
]
