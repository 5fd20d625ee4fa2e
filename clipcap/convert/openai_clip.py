"""OpenAI CLIP checkpoints into ``transformers.CLIPModel`` folders.

**OpenAI CLIP** (openai/CLIP ``.pt``, a TorchScript archive or a plain state dict): ``visual.*`` (ViT only;
ResNet towers, ``visual.layer1...``, are refused), ``token_embedding``, ``positional_embedding``,
``transformer.resblocks.N.*``, ``ln_final``, ``text_projection``, ``logit_scale``; it becomes a
``transformers.CLIPModel`` with QuickGELU and width // 64 heads in both towers, as OpenAI's ``build_model``
has it. ``visual.proj`` and ``text_projection`` are (width, embed): the HF projections are their transposes.

Shapes: D_clip CLIP feature size, H the MLP's hidden width, P prefix length, C the Transformer mapper's
``clip_length``, D the LM's width, V its vocabulary, B batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import CLIPConfig, CLIPModel

from clipcap.checkpoints import read_checkpoint
from clipcap.convert.weights import check_weights_fit, layer_count, require_weight, shape_of, state_dict_of
from clipcap.files import staged_folder

# OpenAI's TorchScript archives also hold these sizes as tensors; build_model drops them too.
_OPENAI_CLIP_SIZE_KEYS = ("input_resolution", "context_length", "vocab_size")


def openai_clip_config(weights: Mapping[str, torch.Tensor], source: str) -> CLIPConfig:
    """The ``CLIPConfig`` of an OpenAI ViT CLIP state dict, inferred from its shapes.

    Raises:
        ValueError: a ResNet image tower, a missing key, or a width that 64-wide heads do not divide.
    """
    resnet_key = next(
        (key for key in weights if key.startswith(("visual.layer1.", "visual.attnpool."))), None
    )
    if resnet_key is not None:
        raise ValueError(
            f"{source}: a ResNet CLIP (key {resnet_key!r}); only ViT CLIPs convert to transformers.CLIPModel"
        )

    def get(key: str) -> torch.Tensor:
        return require_weight(weights, key, source, "an OpenAI ViT CLIP")

    def heads(width: int, tower: str) -> int:
        if width % 64:
            raise ValueError(
                f"{source}: the {tower} width {width} is not a multiple of OpenAI's 64-wide heads"
            )
        return width // 64

    patch_weight = get("visual.conv1.weight")
    vision_width, patch_size = patch_weight.shape[0], patch_weight.shape[-1]
    positions = get("visual.positional_embedding").shape[0] - 1
    grid = round(positions**0.5)
    if grid * grid != positions:
        raise ValueError(
            f"{source}: visual.positional_embedding has {positions + 1} rows, not 1 + a square grid"
        )
    text_width = get("ln_final.weight").shape[0]
    vocab_size = get("token_embedding.weight").shape[0]
    projection_dim = get("text_projection").shape[1]
    if shape_of(get("visual.proj")) != (vision_width, projection_dim):
        raise ValueError(
            f"{source}: visual.proj has shape {shape_of(get('visual.proj'))}; expected {(vision_width, projection_dim)}"
        )
    return CLIPConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": text_width,
            "intermediate_size": get("transformer.resblocks.0.mlp.c_fc.weight").shape[0],
            "num_hidden_layers": layer_count(weights, "transformer.resblocks.", source),
            "num_attention_heads": heads(text_width, "text"),
            "max_position_embeddings": get("positional_embedding").shape[0],
            "hidden_act": "quick_gelu",
            # OpenAI pools at the highest token id, its end-of-text token, the vocabulary's last.
            "bos_token_id": vocab_size - 2,
            "eos_token_id": vocab_size - 1,
        },
        vision_config={
            "hidden_size": vision_width,
            "intermediate_size": get("visual.transformer.resblocks.0.mlp.c_fc.weight").shape[0],
            "num_hidden_layers": layer_count(weights, "visual.transformer.resblocks.", source),
            "num_attention_heads": heads(vision_width, "vision"),
            "image_size": patch_size * grid,
            "patch_size": patch_size,
            "hidden_act": "quick_gelu",
        },
        projection_dim=projection_dim,
        logit_scale_init_value=float(get("logit_scale")),
    )


class _KeyMap(NamedTuple):
    """One ``CLIPModel`` weight: the OpenAI key it comes from and how (``chunk`` of 3, or transposed)."""

    openai_key: str
    chunk: int | None = None
    transpose: bool = False

    def take(self, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        value = weights[self.openai_key]
        if self.chunk is not None:
            value = value.chunk(3)[self.chunk]
        return (value.t() if self.transpose else value).float().contiguous()


def _openai_block_keys(old: str, new: str) -> dict[str, _KeyMap]:
    """One residual attention block: OpenAI's ``old`` prefix, HF's ``new`` prefix."""
    keys: dict[str, _KeyMap] = {}
    for index, name in enumerate(("q", "k", "v")):  # in_proj rows are the queries, keys, then values
        keys[f"{new}self_attn.{name}_proj.weight"] = _KeyMap(old + "attn.in_proj_weight", chunk=index)
        keys[f"{new}self_attn.{name}_proj.bias"] = _KeyMap(old + "attn.in_proj_bias", chunk=index)
    pairs = {
        "attn.out_proj": "self_attn.out_proj",
        "ln_1": "layer_norm1",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
        "ln_2": "layer_norm2",
    }
    for old_name, new_name in pairs.items():
        for kind in ("weight", "bias"):
            keys[f"{new}{new_name}.{kind}"] = _KeyMap(f"{old}{old_name}.{kind}")
    return keys


def openai_clip_key_map(config: CLIPConfig) -> dict[str, _KeyMap]:
    """Every ``CLIPModel`` weight of ``config`` with the OpenAI CLIP key it is made from."""
    keys = {
        "vision_model.embeddings.class_embedding": _KeyMap("visual.class_embedding"),
        "vision_model.embeddings.patch_embedding.weight": _KeyMap("visual.conv1.weight"),
        "vision_model.embeddings.position_embedding.weight": _KeyMap("visual.positional_embedding"),
        "visual_projection.weight": _KeyMap("visual.proj", transpose=True),  # OpenAI's is (width, embed)
        "text_model.embeddings.token_embedding.weight": _KeyMap("token_embedding.weight"),
        "text_model.embeddings.position_embedding.weight": _KeyMap("positional_embedding"),
        "text_projection.weight": _KeyMap("text_projection", transpose=True),
        "logit_scale": _KeyMap("logit_scale"),
    }
    for kind in ("weight", "bias"):
        keys[f"vision_model.pre_layrnorm.{kind}"] = _KeyMap(f"visual.ln_pre.{kind}")
        keys[f"vision_model.post_layernorm.{kind}"] = _KeyMap(f"visual.ln_post.{kind}")
        keys[f"text_model.final_layer_norm.{kind}"] = _KeyMap(f"ln_final.{kind}")
    for index in range(config.vision_config.num_hidden_layers):
        keys |= _openai_block_keys(
            f"visual.transformer.resblocks.{index}.", f"vision_model.encoder.layers.{index}."
        )
    for index in range(config.text_config.num_hidden_layers):
        keys |= _openai_block_keys(f"transformer.resblocks.{index}.", f"text_model.encoder.layers.{index}.")
    return keys


def openai_clip_to_hf(weights: Mapping[str, torch.Tensor], source: str) -> CLIPModel:
    """Converts an OpenAI ViT CLIP state dict into a ``transformers.CLIPModel`` (float32, eval mode).

    Raises:
        ValueError: a ResNet CLIP, or a missing, unexpected or misshapen key (named).
    """
    weights = {key: value for key, value in weights.items() if key not in _OPENAI_CLIP_SIZE_KEYS}
    config = openai_clip_config(weights, source)
    key_map = openai_clip_key_map(config)
    for key_source in key_map.values():
        require_weight(weights, key_source.openai_key, source, "an OpenAI ViT CLIP")
    used = {key_source.openai_key for key_source in key_map.values()}
    unused = [key for key in weights if key not in used]
    if unused:
        raise ValueError(f"{source}: unexpected key {unused[0]!r} for an OpenAI ViT CLIP")
    state = {key: key_source.take(weights) for key, key_source in key_map.items()}
    origin = {key: key_source.openai_key for key, key_source in key_map.items()}
    model = CLIPModel(config)
    check_weights_fit(state, model.state_dict(), source, "CLIPModel", origin=origin)
    model.load_state_dict(state, strict=True)
    return model.eval()


def convert_openai_clip(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Writes an OpenAI CLIP ``.pt`` as a Hugging Face ``CLIPModel`` folder (weights and config only)."""
    model = openai_clip_to_hf(state_dict_of(read_checkpoint(checkpoint), str(checkpoint)), str(checkpoint))
    out_dir = Path(out_dir)
    with staged_folder(out_dir) as staging:
        model.save_pretrained(staging)
    return out_dir
