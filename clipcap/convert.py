"""``clipcap convert``: load the checkpoints of the original projects into clipcap's formats.

::

    clipcap convert clipcap    --checkpoint coco_weights.pt   --out converted/coco [--lm gpt2] [--n_head 12]
    clipcap convert discritune --checkpoint clip_clap_model_final.pt --out converted/dt [--lm gpt2]
    clipcap convert clip       --checkpoint ViT-B-32.pt       --out converted/clip-vit-b-32

``model.init_from`` also takes an original ClipCap or DiscriTune ``.pt`` directly (see
:func:`load_original_captioner_weights`).

Layouts read
------------
**ClipCap** (rmokady/CLIP_prefix_caption, ``train.py``): ``torch.save(model.state_dict())`` of
``ClipCaptionModel``. ``clip_project.*`` is the mapper, ``gpt.*`` a ``GPT2LMHeadModel`` saved by the
transformers of 2021, with the causal-mask buffers ``gpt.transformer.h.N.attn.bias`` and ``...attn.masked_bias``
that current transformers no longer has (the reason those files stopped loading). Mappers:

- ``MLP``: ``clip_project.model.0`` (Linear D_clip → H), Tanh, ``clip_project.model.2`` (Linear H → P·D); it
  becomes :class:`~clipcap.mapper.MLPMapper` (``net.0``, ``net.3``; ``net.2`` is its dropout).
- ``TransformerMapper``: ``clip_project.linear`` (D_clip → C·D), ``clip_project.prefix_const`` (P, D) and
  ``clip_project.transformer.layers.N.{norm1, attn.to_queries, attn.to_keys_values, attn.project, norm2,
  mlp.fc1, mlp.fc2}``: pre-norm layers, 8 heads, ReLU, no bias on the query and key/value projections (the
  key/value projection's rows are the keys, then the values). Its forward appends the constants after the
  C projected tokens and keeps the last P outputs, which is what :class:`~clipcap.mapper.TransformerMapper`
  does with ``nn.TransformerEncoderLayer(norm_first=True)``, so the weights map one to one
  (``in_proj_weight`` = cat(queries, keys, values), ``in_proj_bias`` = 0). Its ``grid_projection``, for patch
  features, has no counterpart and keeps its fresh initialisation.

**DiscriTune** (Dessì et al., CVPR 2023). Its code is EGG's ``egg/zoo/emergent_captioner``; the index searched
here holds it in mbevila/EGG, a fork of facebookresearch/EGG (``egg/zoo/emergent_captioner/finetuning/``
``train.py``, ``game.py``, ``sender.py``). A ``ReinforceCaptionGame`` has a ``sender``, a ``ClipCapSender``
whose ``clipcap`` is ClipCap's model (the MLP mapper, loaded from an official ClipCap file before
fine-tuning), and a CLIP ``receiver``. Its ``ModelSaver`` writes ``clip_clap_model_<epoch|final>.pt``:

- in earlier versions, ``torch.save(game.sender.clipcap.state_dict())``: ClipCap's layout exactly;
- in later ones, ``torch.save(game.state_dict())``: ``sender.clipcap.clip_project.*`` and
  ``sender.clipcap.gpt.*``, plus the frozen CLIPs (``sender.clip_vit.*`` or ``sender.clip.*``, and
  ``receiver.clip.*``), which are ignored.

EGG's own ``CheckpointSaver`` also writes ``<epoch|final>.tar``: a pickled ``egg.core.callbacks.Checkpoint``
named tuple ``(epoch, model_state_dict, optimizer_state_dict, optimizer_scheduler_state_dict)`` holding the
game's state dict; it is read here without EGG. While training, EGG "patches" GPT-2 (``maybe_patch_gpt``,
``setup_input_output_embeddings``): the token embedding grows by B·P rows for the prefix and ``lm_head``
gains a bias that is 0 on the vocabulary and -inf on the added rows. Files saved patched are unpatched here:
the -inf tail of ``gpt.lm_head.bias`` says how many rows to drop. EGG's single-Linear mapper
(``clip_project.weight``, its choice for more than 10 prefix tokens) has no clipcap mapper and is refused.

**OpenAI CLIP** (openai/CLIP ``.pt``, a TorchScript archive or a plain state dict): ``visual.*`` (ViT only;
ResNet towers, ``visual.layer1...``, are refused), ``token_embedding``, ``positional_embedding``,
``transformer.resblocks.N.*``, ``ln_final``, ``text_projection``, ``logit_scale``; it becomes a
``transformers.CLIPModel`` with QuickGELU and width // 64 heads in both towers, as OpenAI's ``build_model``
has it. ``visual.proj`` and ``text_projection`` are (width, embed): the HF projections are their transposes.

``clipcap convert`` reads files with ``torch.load(weights_only=True)`` (no pickled code runs), except
TorchScript archives, which only ``torch.jit.load`` reads.

Shapes: D_clip CLIP feature size, H the MLP's hidden width, P prefix length, C the Transformer mapper's
``clip_length``, D the LM's width, V its vocabulary, B batch.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from transformers import CLIPConfig, CLIPModel, GPT2Config, GPT2LMHeadModel

from clipcap.checkpoints import EggCheckpoint, read_checkpoint
from clipcap.files import staged_folder
from clipcap.mapper import Mapper, MLPMapper, TransformerMapper
from clipcap.pretrained import resolve_pretrained

if TYPE_CHECKING:
    from clipcap.captioner import ClipCaptioner

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

CLIPCAP_MAPPER_PREFIX = "clip_project."
CLIPCAP_LM_PREFIX = "gpt."
DISCRITUNE_PREFIX = "sender.clipcap."
"""Where a DiscriTune (EGG) game state dict keeps its ClipCap model."""

CLIPCAP_TRANSFORMER_HEADS = 8
"""ClipCap's ``TransformerMapper`` always has 8 heads (not inferable from the weights)."""

GPT2_BASE_WIDTH, GPT2_BASE_HEADS = 768, 12

# GPT-2's causal-mask buffers, saved in state dicts by the transformers of 2021 and gone since.
_STALE_GPT2_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")

# OpenAI's TorchScript archives also hold these sizes as tensors; build_model drops them too.
_OPENAI_CLIP_SIZE_KEYS = ("input_resolution", "context_length", "vocab_size")

CONVERTED_CHECKPOINT = "clipcap.ckpt"
CONVERTED_LM = "lm"
CONVERTED_MAPPER = "mapper.safetensors"
CONVERTED_MODEL_CONFIG = "model.yaml"


def state_dict_of(checkpoint: Any, source: str) -> StateDict:
    """The model state dict inside what :func:`read_checkpoint` returned.

    Unwraps EGG's ``Checkpoint`` and a ``model_state_dict`` entry, and strips the ``module.`` prefix that
    ``DataParallel`` adds.

    Raises:
        ValueError: a Lightning checkpoint (already clipcap's), or no state dict of tensors.
    """
    if isinstance(checkpoint, EggCheckpoint):
        checkpoint = checkpoint.model_state_dict
    if (
        isinstance(checkpoint, Mapping)
        and "state_dict" in checkpoint
        and "pytorch-lightning_version" in checkpoint
    ):
        raise ValueError(f"{source} is a Lightning checkpoint (clipcap's own format): it needs no conversion")
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model_state_dict"), Mapping):
        checkpoint = checkpoint["model_state_dict"]
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise ValueError(f"{source}: expected a state dict of tensors, got {type(checkpoint).__name__}")
    not_tensors = [key for key, value in checkpoint.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"{source}: expected a state dict of tensors, but key {not_tensors[0]!r} holds "
            f"{type(checkpoint[not_tensors[0]]).__name__} (top-level keys: {list(checkpoint)[:8]})"
        )
    weights = dict(checkpoint)
    if all(key.startswith("module.") for key in weights):
        weights = {key[len("module.") :]: value for key, value in weights.items()}
    return weights


def _require(
    weights: Mapping[str, torch.Tensor], key: str, source: str, what: str, shown_prefix: str = ""
) -> torch.Tensor:
    """``weights[key]``, or an error naming the file and the key as the file spells it (``shown_prefix``)."""
    if key not in weights:
        raise ValueError(f"{source}: {what} needs key {shown_prefix + key!r}, which is missing")
    return weights[key]


def _layer_count(weights: Mapping[str, torch.Tensor], prefix: str, source: str) -> int:
    """How many ``<prefix>N.`` blocks there are; they must be numbered 0..N-1."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(match.group(1)) for key in weights if (match := pattern.match(key))}
    if indices != set(range(len(indices))):
        raise ValueError(
            f"{source}: layers {prefix}N are not numbered 0..{len(indices) - 1}: {sorted(indices)}"
        )
    return len(indices)


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def check_weights_fit(
    weights: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    source: str,
    what: str,
    may_be_missing: set[str] | frozenset[str] = frozenset(),
    origin: Mapping[str, str] | None = None,
) -> None:
    """Checks that ``weights`` load into a module whose state dict is ``target``: same keys, same shapes.

    Args:
        weights: converted weights.
        target: the receiving module's ``state_dict()``.
        source: the file they came from, for messages.
        what: the receiving part, for messages ("mapper", "GPT-2", ...).
        may_be_missing: target keys that the weights need not provide.
        origin: the original key of each converted key, named in messages.

    Raises:
        ValueError: the first missing, unexpected or differently shaped key, with both shapes.
    """
    origin = origin or {}

    def name(key: str) -> str:
        return f"{key!r} (from {origin[key]!r})" if key in origin and origin[key] != key else repr(key)

    for key, value in weights.items():
        if key not in target:
            raise ValueError(
                f"{source}: {what} has no weight {name(key)}; expected keys like {list(target)[:4]}"
            )
        if _shape(value) != _shape(target[key]):
            raise ValueError(
                f"{source}: {what} weight {name(key)} has shape {_shape(value)} in the checkpoint but "
                f"{_shape(target[key])} here"
            )
    missing = [key for key in target if key not in weights and key not in may_be_missing]
    if missing:
        raise ValueError(f"{source}: the checkpoint has no weight for {what} key {missing[0]!r}")


# ---------------------------------------------------------------------------------------------------------
# ClipCap and DiscriTune captioners


@dataclass
class MapperWeights:
    """A mapper read from an original checkpoint, in clipcap's layout.

    Attributes:
        mapper_class: the clipcap mapper that computes what the original did.
        init_args: its options besides (clip_dim, lm_dim).
        clip_dim: CLIP feature size (D_clip).
        lm_dim: LM width (D).
        state_dict: its weights under the clipcap mapper's keys; keys without an original counterpart
            (``TransformerMapper.grid_projection``) are absent.
        origin: the original key of each converted key (for error messages).
    """

    mapper_class: type[Mapper]
    init_args: dict[str, Any]
    clip_dim: int
    lm_dim: int
    state_dict: StateDict
    origin: dict[str, str] = field(default_factory=dict)

    @property
    def class_path(self) -> str:
        return f"{self.mapper_class.__module__}.{self.mapper_class.__qualname__}"

    def build(self) -> Mapper:
        """A mapper holding these weights (in eval mode)."""
        mapper = self.mapper_class(self.clip_dim, self.lm_dim, **self.init_args)
        self.load_into(mapper, source="converted weights")
        return mapper.eval()

    def check_fits(self, mapper: Mapper, source: str) -> None:
        """Checks that the weights fit an existing mapper: same class, sizes and head count.

        Raises:
            ValueError: another mapper class, another head count, or a key whose shape differs.
        """
        if type(mapper) is not self.mapper_class:
            raise ValueError(
                f"{source} holds a ClipCap {self.mapper_class.__name__} but this captioner's mapper is a "
                f"{type(mapper).__name__}: set model.captioner.init_args.mapper.class_path={self.class_path}"
            )
        target = mapper.state_dict()
        check_weights_fit(
            self.state_dict, target, source, "mapper", set(target) - set(self.state_dict), self.origin
        )
        if isinstance(mapper, TransformerMapper):
            heads = mapper.transformer.layers[0].self_attn.num_heads
            if heads != self.init_args["num_heads"]:
                raise ValueError(
                    f"{source}: ClipCap's Transformer mapper has {self.init_args['num_heads']} heads but this "
                    f"captioner's has {heads}: set mapper init_args.num_heads={self.init_args['num_heads']}"
                )

    def load_into(self, mapper: Mapper, source: str) -> None:
        """Copies the weights into an existing mapper (see :meth:`check_fits` for what must match)."""
        self.check_fits(mapper, source)
        mapper.load_state_dict(self.state_dict, strict=False)


def clipcap_mapper_weights(
    clip_project: Mapping[str, torch.Tensor], lm_dim: int, source: str
) -> MapperWeights:
    """Converts ClipCap's ``clip_project`` weights (prefix already stripped) for clipcap's mapper.

    Args:
        clip_project: the mapper's weights, e.g. ``model.0.weight`` or ``linear.weight``.
        lm_dim: the LM's width (D), from its token embedding.
        source: the file, for messages.

    Raises:
        ValueError: an unknown mapper, a missing or unexpected key, or inconsistent shapes.
    """
    if "model.0.weight" in clip_project:
        return _mlp_mapper_weights(clip_project, lm_dim, source)
    if "linear.weight" in clip_project and "prefix_const" in clip_project:
        return _transformer_mapper_weights(clip_project, lm_dim, source)
    if "weight" in clip_project:
        raise ValueError(
            f"{source}: {CLIPCAP_MAPPER_PREFIX}weight is a single Linear mapper (EGG's choice for more than 10 "
            "prefix tokens); clipcap has no such mapper"
        )
    raise ValueError(
        f"{source}: unknown ClipCap mapper (keys {sorted(clip_project)[:6]}); expected "
        f"{CLIPCAP_MAPPER_PREFIX}model.0.weight (MLP) or {CLIPCAP_MAPPER_PREFIX}linear.weight and "
        f"{CLIPCAP_MAPPER_PREFIX}prefix_const (Transformer)"
    )


def _mlp_mapper_weights(weights: Mapping[str, torch.Tensor], lm_dim: int, source: str) -> MapperWeights:
    # ClipCap's MLP is Sequential(Linear, Tanh, Linear); MLPMapper's is Sequential(Linear, Tanh, Dropout, Linear).
    renames = {"model.0.": "net.0.", "model.2.": "net.3."}
    converted, origin = {}, {}
    for key, value in weights.items():
        new_prefix = next((new for old, new in renames.items() if key.startswith(old)), None)
        if new_prefix is None:
            raise ValueError(
                f"{source}: unexpected ClipCap MLP key {CLIPCAP_MAPPER_PREFIX}{key}: clipcap's MLPMapper has "
                "two Linear layers (model.0 and model.2)"
            )
        new_key = new_prefix + key.split(".", 2)[2]
        converted[new_key] = value
        origin[new_key] = CLIPCAP_MAPPER_PREFIX + key
    for old_key in ("model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"):
        _require(weights, old_key, source, "the ClipCap MLP mapper", CLIPCAP_MAPPER_PREFIX)
    hidden_dim, clip_dim = _shape(converted["net.0.weight"])
    out_dim, hidden_in = _shape(converted["net.3.weight"])
    if hidden_in != hidden_dim or out_dim % lm_dim:
        raise ValueError(
            f"{source}: {CLIPCAP_MAPPER_PREFIX}model.2.weight has shape {(out_dim, hidden_in)}; expected "
            f"(P·{lm_dim}, {hidden_dim}) for GPT-2 width {lm_dim}"
        )
    return MapperWeights(
        MLPMapper,
        {"prefix_length": out_dim // lm_dim, "hidden_dim": hidden_dim},
        clip_dim,
        lm_dim,
        converted,
        origin,
    )


# ClipCap's TransformerLayer names → nn.TransformerEncoderLayer's (weight and bias each).
_TRANSFORMER_LAYER_RENAMES = {
    "attn.project": "self_attn.out_proj",
    "norm1": "norm1",
    "norm2": "norm2",
    "mlp.fc1": "linear1",
    "mlp.fc2": "linear2",
}


def _transformer_mapper_weights(
    weights: Mapping[str, torch.Tensor], lm_dim: int, source: str
) -> MapperWeights:
    remaining = set(weights)
    converted: StateDict = {}
    origin: dict[str, str] = {}

    def take(key: str) -> torch.Tensor:
        remaining.discard(key)
        return _require(weights, key, source, "the ClipCap Transformer mapper", CLIPCAP_MAPPER_PREFIX)

    def put(new_key: str, value: torch.Tensor, old_key: str) -> None:
        converted[new_key] = value
        origin[new_key] = CLIPCAP_MAPPER_PREFIX + old_key

    linear = take("linear.weight")
    put("pooled_projection.weight", linear, "linear.weight")
    put("pooled_projection.bias", take("linear.bias"), "linear.bias")
    prefix_constants = take("prefix_const")
    put("prefix_constants", prefix_constants, "prefix_const")
    prefix_length, width = _shape(prefix_constants)
    if width != lm_dim or linear.shape[0] % lm_dim:
        raise ValueError(
            f"{source}: the Transformer mapper's shapes (prefix_const {_shape(prefix_constants)}, "
            f"linear.weight {_shape(linear)}) do not fit GPT-2 width {lm_dim}"
        )
    if lm_dim % CLIPCAP_TRANSFORMER_HEADS:
        raise ValueError(f"{source}: GPT-2 width {lm_dim} is not divisible by ClipCap's 8 mapper heads")
    num_layers = _layer_count(weights, "transformer.layers.", source)
    if num_layers == 0:
        raise ValueError(
            f"{source}: the Transformer mapper has no {CLIPCAP_MAPPER_PREFIX}transformer.layers.N"
        )
    for index in range(num_layers):
        layer = f"transformer.layers.{index}."
        queries = take(layer + "attn.to_queries.weight")
        keys_values = take(layer + "attn.to_keys_values.weight")  # rows: the keys, then the values
        put(
            layer + "self_attn.in_proj_weight",
            torch.cat([queries, keys_values]),
            layer + "attn.to_queries.weight",
        )
        # ClipCap's TransformerLayer builds both projections without bias (bias=False) unless asked to.
        biases = [
            take(key) if key in weights else torch.zeros(rows.shape[0], dtype=rows.dtype)
            for key, rows in (
                (layer + "attn.to_queries.bias", queries),
                (layer + "attn.to_keys_values.bias", keys_values),
            )
        ]
        put(layer + "self_attn.in_proj_bias", torch.cat(biases), layer + "attn.to_queries.bias")
        for old_name, new_name in _TRANSFORMER_LAYER_RENAMES.items():
            for kind in ("weight", "bias"):
                put(
                    f"{layer}{new_name}.{kind}",
                    take(f"{layer}{old_name}.{kind}"),
                    f"{layer}{old_name}.{kind}",
                )
    if remaining:
        raise ValueError(
            f"{source}: unexpected Transformer mapper key {CLIPCAP_MAPPER_PREFIX}{sorted(remaining)[0]}"
        )
    hidden = converted["transformer.layers.0.linear1.weight"].shape[0]
    mlp_ratio = hidden / lm_dim  # ClipCap's is 2.0
    if int(lm_dim * mlp_ratio) != hidden:
        raise ValueError(f"{source}: feed-forward width {hidden} is not a representable multiple of {lm_dim}")
    init_args = {
        "prefix_length": prefix_length,
        "clip_length": linear.shape[0] // lm_dim,
        "num_layers": num_layers,
        "num_heads": CLIPCAP_TRANSFORMER_HEADS,
        "mlp_ratio": mlp_ratio,
    }
    return MapperWeights(TransformerMapper, init_args, linear.shape[1], lm_dim, converted, origin)


def gpt2_weights(gpt: Mapping[str, torch.Tensor], source: str) -> StateDict:
    """Converts ClipCap's ``gpt.*`` weights (prefix already stripped) for today's ``GPT2LMHeadModel``.

    Drops the stale ``attn.bias``/``attn.masked_bias`` buffers, and undoes EGG's patching: a ``lm_head.bias``
    that is 0 on the vocabulary and -inf on B·P added rows goes, and so do those rows.

    Raises:
        ValueError: no token embedding, or an output bias that is not EGG's padding.
    """
    weights = {key: value for key, value in gpt.items() if not _STALE_GPT2_BUFFER.match(key)}
    embeddings = _require(weights, "transformer.wte.weight", source, "GPT-2", CLIPCAP_LM_PREFIX)
    bias = weights.pop("lm_head.bias", None)
    if bias is not None:
        finite = torch.isfinite(bias)
        vocab_size = int(finite.sum())
        if bias.shape[0] != embeddings.shape[0] or not finite[:vocab_size].all() or bias[:vocab_size].any():
            raise ValueError(
                f"{source}: {CLIPCAP_LM_PREFIX}lm_head.bias is not EGG's prefix padding (0 on the vocabulary, "
                "-inf on the added rows); GPT-2 has no output bias"
            )
        for key in ("transformer.wte.weight", "lm_head.weight"):
            if key in weights:
                weights[key] = weights[key][:vocab_size]
    return weights


def gpt2_config(
    weights: Mapping[str, torch.Tensor], source: str, lm: str | None = None, n_head: int | None = None
) -> GPT2Config:
    """The GPT-2 configuration of converted weights: read from ``lm``, or inferred from the shapes.

    Args:
        weights: weights from :func:`gpt2_weights`.
        source: the file, for messages.
        lm: a Hugging Face name or folder whose configuration to use; inferred from shapes if None.
        n_head: attention heads (shapes do not tell); GPT-2's 12 by default when the width is 768, and
            required otherwise. Overrides ``lm``'s when both are given.

    Raises:
        ValueError: ``lm`` is not a GPT-2, or the head count is unknown or does not divide the width.
    """
    if lm is not None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolve_pretrained(lm))
        if not isinstance(config, GPT2Config):
            raise ValueError(f"--lm {lm} is a {config.model_type!r} model; ClipCap checkpoints hold a GPT-2")
        if n_head is not None:
            config.n_head = n_head
        return config
    embeddings = _require(weights, "transformer.wte.weight", source, "GPT-2", CLIPCAP_LM_PREFIX)
    positions = _require(weights, "transformer.wpe.weight", source, "GPT-2", CLIPCAP_LM_PREFIX)
    vocab_size, n_embd = _shape(embeddings)
    if n_head is None:
        if n_embd != GPT2_BASE_WIDTH:
            raise ValueError(
                f"{source}: GPT-2 of width {n_embd} (not GPT-2 base's 768): pass its head count (--n_head) or "
                "its Hugging Face name or folder (--lm)"
            )
        n_head = GPT2_BASE_HEADS
    if n_embd % n_head:
        raise ValueError(f"{source}: n_head={n_head} does not divide the GPT-2 width {n_embd}")
    feed_forward = _require(weights, "transformer.h.0.mlp.c_fc.weight", source, "GPT-2", CLIPCAP_LM_PREFIX)
    inner = feed_forward.shape[1]  # GPT-2's Conv1D weights are (in, out)
    lm_head = weights.get("lm_head.weight")
    tied = lm_head is None or (lm_head.device.type != "meta" and torch.equal(lm_head, embeddings))
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=positions.shape[0],
        n_embd=n_embd,
        n_layer=_layer_count(weights, "transformer.h.", source),
        n_head=n_head,
        n_inner=None if inner == 4 * n_embd else inner,
        # <|endoftext|> is GPT-2's last token.
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
        tie_word_embeddings=tied,
    )


@dataclass
class OriginalCaptioner:
    """A ClipCap or DiscriTune captioner read from its original checkpoint.

    Attributes:
        mapper: the mapper, in clipcap's layout.
        lm_weights: ``GPT2LMHeadModel`` weights, stale buffers dropped and EGG's patching undone.
        source: the file it came from.
    """

    mapper: MapperWeights
    lm_weights: StateDict
    source: str

    def build_lm(self, lm: str | None = None, n_head: int | None = None) -> GPT2LMHeadModel:
        """The GPT-2 holding the checkpoint's weights (see :func:`gpt2_config` for ``lm`` and ``n_head``).

        Raises:
            ValueError: the weights do not fit the configuration (the key and both shapes are named).
        """
        config = gpt2_config(self.lm_weights, self.source, lm, n_head)
        model = GPT2LMHeadModel(config)
        may_be_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
        check_weights_fit(self.lm_weights, model.state_dict(), self.source, "GPT-2", may_be_missing)
        model.load_state_dict(self.lm_weights, strict=False)
        return model.eval()


def find_clipcap_prefix(weights: Mapping[str, torch.Tensor]) -> str | None:
    """The prefix under which a state dict keeps a ClipCap model: ``""``, DiscriTune's, or None."""
    for prefix in ("", DISCRITUNE_PREFIX):
        mapper = any(key.startswith(prefix + CLIPCAP_MAPPER_PREFIX) for key in weights)
        if mapper and any(key.startswith(prefix + CLIPCAP_LM_PREFIX) for key in weights):
            return prefix
    return None


def original_captioner(
    weights: Mapping[str, torch.Tensor], source: str, prefix: str | None = None
) -> OriginalCaptioner:
    """Reads a ClipCap model out of a ClipCap or DiscriTune state dict.

    Args:
        weights: the state dict (see :func:`state_dict_of`).
        source: the file, for messages.
        prefix: where the ClipCap model is (``""`` for ClipCap, :data:`DISCRITUNE_PREFIX`); found if None.

    Raises:
        ValueError: no ClipCap model there, or one that does not convert.
    """
    if prefix is None:
        prefix = find_clipcap_prefix(weights)
    if prefix is None or not any(key.startswith(prefix + CLIPCAP_MAPPER_PREFIX) for key in weights):
        where = {None: f"the top level or under {DISCRITUNE_PREFIX!r}", "": "the top level"}.get(
            prefix, repr(prefix)
        )
        found = find_clipcap_prefix(weights)
        commands = {
            "": "a ClipCap file: `clipcap convert clipcap`",
            DISCRITUNE_PREFIX: "`clipcap convert discritune`",
        }
        hint = f"; they are under {found!r} ({commands[found]})" if found is not None else ""
        raise ValueError(
            f"{source}: not a ClipCap or DiscriTune checkpoint: no {CLIPCAP_MAPPER_PREFIX}* and "
            f"{CLIPCAP_LM_PREFIX}* keys at {where}{hint} (first keys: {list(weights)[:5]})"
        )
    mapper_prefix, lm_prefix = prefix + CLIPCAP_MAPPER_PREFIX, prefix + CLIPCAP_LM_PREFIX
    clip_project = {
        key[len(mapper_prefix) :]: value for key, value in weights.items() if key.startswith(mapper_prefix)
    }
    gpt = {key[len(lm_prefix) :]: value for key, value in weights.items() if key.startswith(lm_prefix)}
    if prefix == "":
        others = [key for key in weights if not key.startswith((mapper_prefix, lm_prefix))]
        if others:
            raise ValueError(f"{source}: unexpected key {others[0]!r} in a ClipCap checkpoint")
    lm_weights = gpt2_weights(gpt, source)
    lm_dim = lm_weights["transformer.wte.weight"].shape[1]
    return OriginalCaptioner(clipcap_mapper_weights(clip_project, lm_dim, source), lm_weights, source)


def read_original_captioner(path: str | Path, prefix: str | None = None) -> OriginalCaptioner:
    """Reads a ClipCap (``prefix=""``) or DiscriTune (:data:`DISCRITUNE_PREFIX`) file; either if None."""
    return original_captioner(state_dict_of(read_checkpoint(path), str(path)), str(path), prefix)


def load_original_captioner_weights(captioner: ClipCaptioner, checkpoint: Any, source: str) -> None:
    """Copies an original ClipCap or DiscriTune model into ``captioner`` (``model.init_from``).

    The captioner must already have the same architecture: the mapper class and sizes, and a GPT-2 of the
    same shapes. A frozen LM keeps the weights of its pretrained source (checkpoints do not store it), so
    the checkpoint's GPT-2 must equal them; a fine-tuned one needs a trainable LM or the LM folder that
    ``clipcap convert`` writes.

    Args:
        captioner: the captioner to fill.
        checkpoint: what :func:`read_checkpoint` or ``torch.load`` returned for ``source``.
        source: the file, for messages.

    Raises:
        ValueError: the first mismatch, naming the key and both shapes.
    """
    from clipcap.captioner import ClipCaptioner

    if not isinstance(captioner, ClipCaptioner):
        raise ValueError(
            f"{source} is a ClipCap model; it fits a ClipCaptioner, not a {type(captioner).__name__}"
        )
    original = original_captioner(state_dict_of(checkpoint, source), source)
    if original.mapper.clip_dim != captioner.clip_dim:
        raise ValueError(
            f"{source}: its mapper takes {original.mapper.clip_dim}-d CLIP features but "
            f"model.captioner.init_args.clip_dim={captioner.clip_dim}"
        )
    original.mapper.check_fits(captioner.mapper, source)
    lm = captioner.lm.model
    target = lm.state_dict()
    tied = getattr(lm.config, "tie_word_embeddings", False)
    check_weights_fit(
        original.lm_weights,
        target,
        source,
        f"the LM ({type(lm).__name__})",
        {"lm_head.weight"} if tied else set(),
    )
    if not captioner.lm.trainable:
        changed = next(
            (k for k, v in original.lm_weights.items() if not torch.equal(v.to(target[k].dtype), target[k])),
            None,
        )
        if changed is not None:
            raise ValueError(
                f"{source}: its GPT-2 differs from the frozen LM {captioner.lm.pretrained!r} (first at "
                f"{CLIPCAP_LM_PREFIX}{changed}); a frozen LM is reloaded from its pretrained source, so make it "
                "trainable, or run `clipcap convert` and set language_model.init_args.pretrained to its lm folder"
            )
    captioner.mapper.load_state_dict(original.mapper.state_dict, strict=False)
    lm.load_state_dict(original.lm_weights, strict=False)


# ---------------------------------------------------------------------------------------------------------
# Writing a converted captioner


ORIGINAL_DECODING: dict[str, dict[str, Any]] = {
    # ClipCap trained without EOS: captions end after the "." token (generate2/generate_beam stop there,
    # up to 67 tokens), beams are ranked by generate_beam's mean log-probability; predict.py decodes
    # greedily (generate2) unless asked for beam search.
    "clipcap": {
        "captioner": {"caption_end": "period_token", "beam_ranking": "clipcap"},
        "decoding": {"num_beams": 1, "max_new_tokens": 67},
    },
    # EGG's DiscriTune stops after any token holding "." (its logits processor then forces EOS) and tests
    # with transformers' beam search, 5 beams, its default early_stopping (False), max_len 40 of which the
    # 10 prefix positions leave 30 caption tokens.
    "discritune": {
        "captioner": {"caption_end": "eos_or_period", "beam_ranking": "transformers"},
        "decoding": {"num_beams": 5, "max_new_tokens": 30, "early_stopping": False},
    },
}
"""The decoding each original used, which a converted checkpoint carries: the captioner's ``caption_end``
and ``beam_ranking`` (every decoding of it follows them) and the module's ``decoding`` (``clipcap caption``
and ``predict``)."""


def captioner_config(mapper: MapperWeights, lm_folder: str, original: str | None = None) -> dict[str, Any]:
    """The ``model.captioner`` config (class path and init args) that rebuilds a converted captioner; with
    ``original`` (``clipcap`` or ``discritune``), decoding as that original did (:data:`ORIGINAL_DECODING`)."""
    conventions = ORIGINAL_DECODING[original]["captioner"] if original is not None else {}
    return {
        "class_path": "clipcap.captioner.ClipCaptioner",
        "init_args": {
            "language_model": {
                "class_path": "clipcap.lm.PrefixLM",
                "init_args": {"pretrained": lm_folder, "trainable": False},
            },
            "mapper": {"class_path": mapper.class_path, "init_args": dict(mapper.init_args)},
            "clip_dim": mapper.clip_dim,
            # ClipCap and DiscriTune feed CLIP's raw (unnormalised) image embedding to the mapper.
            "normalize_clip_features": False,
            **conventions,
        },
    }


def model_config_overlay(mapper: MapperWeights, lm_folder: str, checkpoint: str) -> dict[str, Any]:
    """A ``model:`` config to give after a training config (``--config train.yaml --config this.yaml``).

    It sets what the conversion decides (the LM folder, the mapper, ``init_from``) and leaves the rest to
    the training config: whether the LM trains, and ``clip_dim``, which the CLI links from the data. It
    does not carry the original's decoding: a run trained by clipcap learns to end captions with EOS.
    """
    captioner = captioner_config(mapper, lm_folder)
    del captioner["init_args"]["clip_dim"]
    del captioner["init_args"]["language_model"]["init_args"]["trainable"]
    return {"model": {"captioner": captioner, "init_from": checkpoint}}


def _save_tokenizer(source: str | None, folder: Path) -> None:
    from transformers import AutoTokenizer

    advice = f"copy GPT-2's tokenizer files into {folder}, or run again with --lm NAME_OR_FOLDER"
    if source is None:
        logger.warning("No tokenizer written (the vocabulary is not GPT-2's): %s", advice)
        return
    try:
        AutoTokenizer.from_pretrained(resolve_pretrained(source)).save_pretrained(folder)
    except (OSError, ValueError) as error:
        logger.warning("No tokenizer written: %s cannot be loaded (%s); %s", source, error, advice)


def write_converted_captioner(
    original: OriginalCaptioner,
    out_dir: str | Path,
    lm: str | None = None,
    n_head: int | None = None,
    kind: str = "clipcap",
) -> Path:
    """Writes a converted captioner.

    ``out_dir`` receives:

    - ``lm/``: the GPT-2 as a Hugging Face folder, with the tokenizer of ``lm`` (or of ``gpt2`` for GPT-2's
      vocabulary, when it can be loaded);
    - ``mapper.safetensors``: the mapper's weights, with its class path and init args in the metadata
      (:func:`load_converted_mapper` reads it);
    - ``clipcap.ckpt``: a checkpoint that ``CaptionModule.load_from_checkpoint``, ``clipcap caption --ckpt``
      and ``model.init_from`` take. Like a frozen-LM checkpoint, it holds the mapper and points at ``lm/``
      for the LM's weights;
    - ``model.yaml``: a config overlay that starts a run from it
      (``clipcap fit --config lightning_configs/coco/ce.yaml --config out_dir/model.yaml``).

    Args:
        original: what :func:`read_original_captioner` read.
        out_dir: the output folder: it must not exist yet (or be empty); written under a temporary name
            and renamed when complete.
        lm: Hugging Face name or folder for the GPT-2 configuration and tokenizer (see :func:`gpt2_config`).
        n_head: GPT-2's head count.
        kind: ``clipcap`` or ``discritune``: whose decoding the checkpoint carries (:data:`ORIGINAL_DECODING`).

    Returns:
        The path of ``clipcap.ckpt``.
    """
    if kind not in ORIGINAL_DECODING:
        raise ValueError(f"kind must be one of {sorted(ORIGINAL_DECODING)}, got {kind!r}")
    out_dir = Path(out_dir).resolve()
    # Paths inside the files name the final folder; everything is written to a staging folder first.
    lm_dir = out_dir / CONVERTED_LM
    checkpoint_path = out_dir / CONVERTED_CHECKPOINT
    model = original.build_lm(lm, n_head)
    with staged_folder(out_dir) as staging:
        _write_converted_captioner(original, model, lm, staging, lm_dir, checkpoint_path, kind)
    return checkpoint_path


def _write_converted_captioner(
    original: OriginalCaptioner,
    model: GPT2LMHeadModel,
    lm: str | None,
    staging: Path,
    lm_dir: Path,
    checkpoint_path: Path,
    kind: str,
) -> None:
    import lightning
    import yaml
    from safetensors.torch import save_file

    out_dir = lm_dir.parent
    model.save_pretrained(staging / CONVERTED_LM)
    _save_tokenizer(
        lm if lm is not None else ("gpt2" if model.config.vocab_size == 50257 else None),
        staging / CONVERTED_LM,
    )

    mapper = original.mapper
    save_file(
        {key: value.contiguous() for key, value in mapper.state_dict.items()},
        staging / CONVERTED_MAPPER,
        metadata={
            "class_path": mapper.class_path,
            "init_args": json.dumps(mapper.init_args),
            "clip_dim": str(mapper.clip_dim),
            "lm_dim": str(mapper.lm_dim),
            "source": original.source,
        },
    )
    header = (
        f"# The captioner converted from {original.source} by `clipcap convert`. Give it after a training\n"
        f"# config: clipcap fit --config lightning_configs/coco/ce.yaml --config {out_dir / CONVERTED_MODEL_CONFIG}\n"
    )
    overlay = model_config_overlay(mapper, str(lm_dir), str(checkpoint_path))
    (staging / CONVERTED_MODEL_CONFIG).write_text(header + yaml.safe_dump(overlay, sort_keys=False))

    # The mapper built here supplies the keys that have no original (grid_projection), so that the
    # checkpoint loads strictly.
    state_dict = {f"captioner.mapper.{key}": value for key, value in mapper.build().state_dict().items()}
    state_dict["skipped_steps"] = torch.zeros((), dtype=torch.long)
    checkpoint = {
        "state_dict": state_dict,
        # What LightningCLI saves, so that load_from_checkpoint rebuilds the module.
        "hyper_parameters": {
            "captioner": captioner_config(mapper, str(lm_dir), kind),
            "objective": {"class_path": "clipcap.objectives.CrossEntropy", "init_args": {}},
            "decoding": dict(ORIGINAL_DECODING[kind]["decoding"]),
            "init_from": None,
            "_instantiator": "lightning.pytorch.cli.instantiate_module",
        },
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
        "clipcap_frozen_lm": str(lm_dir),
        "clipcap_converted_from": original.source,
    }
    torch.save(checkpoint, staging / checkpoint_path.name)


def load_converted_mapper(path: str | Path) -> Mapper:
    """Rebuilds the mapper from the ``mapper.safetensors`` that :func:`write_converted_captioner` wrote."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    classes = {cls.__name__: cls for cls in (MLPMapper, TransformerMapper)}
    mapper_class = classes[metadata["class_path"].rsplit(".", 1)[1]]
    weights = MapperWeights(
        mapper_class,
        json.loads(metadata["init_args"]),
        int(metadata["clip_dim"]),
        int(metadata["lm_dim"]),
        load_file(str(path)),
    )
    return weights.build()


def convert_clipcap(
    checkpoint: str | Path, out_dir: str | Path, lm: str | None = None, n_head: int | None = None
) -> Path:
    """Converts an original ClipCap ``.pt`` (see :func:`write_converted_captioner`); returns ``clipcap.ckpt``."""
    return write_converted_captioner(
        read_original_captioner(checkpoint, prefix=""), out_dir, lm, n_head, kind="clipcap"
    )


def convert_discritune(
    checkpoint: str | Path, out_dir: str | Path, lm: str | None = None, n_head: int | None = None
) -> Path:
    """Converts a DiscriTune (EGG) checkpoint: a game's or its ClipCap model's state dict, or EGG's ``.tar``.

    See :func:`write_converted_captioner`.
    """
    return write_converted_captioner(
        read_original_captioner(checkpoint), out_dir, lm, n_head, kind="discritune"
    )


# ---------------------------------------------------------------------------------------------------------
# OpenAI CLIP


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
        return _require(weights, key, source, "an OpenAI ViT CLIP")

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
    if _shape(get("visual.proj")) != (vision_width, projection_dim):
        raise ValueError(
            f"{source}: visual.proj has shape {_shape(get('visual.proj'))}; expected {(vision_width, projection_dim)}"
        )
    return CLIPConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": text_width,
            "intermediate_size": get("transformer.resblocks.0.mlp.c_fc.weight").shape[0],
            "num_hidden_layers": _layer_count(weights, "transformer.resblocks.", source),
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
            "num_hidden_layers": _layer_count(weights, "visual.transformer.resblocks.", source),
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
        _require(weights, key_source.openai_key, source, "an OpenAI ViT CLIP")
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


# ---------------------------------------------------------------------------------------------------------
# Command line


def _convert_captioner_command(convert: Any, args: argparse.Namespace) -> Path:
    written = convert(args.checkpoint, args.out, args.lm, args.n_head)
    print(
        f"wrote {written.parent}: {CONVERTED_LM}/, {CONVERTED_MAPPER}, {CONVERTED_MODEL_CONFIG}, "
        f"{CONVERTED_CHECKPOINT}\nstart a run from it: clipcap fit --config <training config> "
        f"--config {written.parent / CONVERTED_MODEL_CONFIG}\n"
        f"or, in a config of your own: --model.init_from={written}"
    )
    return written


def _convert_clip_command(args: argparse.Namespace) -> Path:
    written = convert_openai_clip(args.checkpoint, args.out)
    print(f"wrote {written} (a transformers.CLIPModel folder: use it as data.init_args.clip_model)")
    return written


def main(argv: list[str] | None = None) -> Path:
    """Entry point of ``clipcap convert``; returns what it wrote (``clipcap.ckpt`` or the CLIP folder)."""
    parser = argparse.ArgumentParser(prog="clipcap convert", description=__doc__.splitlines()[0])
    kinds = parser.add_subparsers(dest="kind", required=True)
    captioner_kinds = {
        "clipcap": ("an original ClipCap .pt (rmokady/CLIP_prefix_caption)", convert_clipcap),
        "discritune": (
            "a DiscriTune game checkpoint (EGG's clip_clap_model_*.pt or *.tar)",
            convert_discritune,
        ),
    }
    for name, (help_text, convert) in captioner_kinds.items():
        sub = kinds.add_parser(name, help=help_text)
        sub.add_argument("--checkpoint", required=True, help=help_text)
        sub.add_argument(
            "--out", required=True, help="output folder (lm/, mapper.safetensors, model.yaml, clipcap.ckpt)"
        )
        sub.add_argument("--lm", default=None, help="GPT-2 name or folder for its config and tokenizer")
        sub.add_argument("--n_head", type=int, default=None, help="GPT-2's heads (default 12 for width 768)")
        sub.set_defaults(run=functools.partial(_convert_captioner_command, convert))
    clip = kinds.add_parser("clip", help="an OpenAI CLIP .pt (ViT) to a Hugging Face CLIPModel folder")
    clip.add_argument("--checkpoint", required=True, help="e.g. ViT-B-32.pt from openai/CLIP")
    clip.add_argument("--out", required=True, help="output folder")
    clip.set_defaults(run=_convert_clip_command)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (ValueError, OSError) as error:  # FileNotFoundError is an OSError
        raise SystemExit(f"clipcap convert {args.kind}: {error}") from error
