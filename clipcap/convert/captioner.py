"""Original captioner checkpoints: ClipCap's and DiscriTune's, into clipcap's mapper, GPT-2 and checkpoint.

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

Shapes: D_clip CLIP feature size, H the MLP's hidden width, P prefix length, C the Transformer mapper's
``clip_length``, D the LM's width, V its vocabulary, B batch.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from clipcap.captioner import ClipCaptioner
from clipcap.checkpoints import read_checkpoint
from clipcap.convert.weights import (
    StateDict,
    check_weights_fit,
    layer_count,
    require_weight,
    shape_of,
    state_dict_of,
)
from clipcap.files import staged_folder
from clipcap.mapper import Mapper, MLPMapper, TransformerMapper
from clipcap.pretrained import resolve_pretrained

if TYPE_CHECKING:
    from clipcap.captioner import ClipCaptioner

logger = logging.getLogger(__name__)

CLIPCAP_MAPPER_PREFIX = "clip_project."
CLIPCAP_LM_PREFIX = "gpt."
DISCRITUNE_PREFIX = "sender.clipcap."
"""Where a DiscriTune (EGG) game state dict keeps its ClipCap model."""

CLIPCAP_TRANSFORMER_HEADS = 8
"""ClipCap's ``TransformerMapper`` always has 8 heads (not inferable from the weights)."""

GPT2_BASE_WIDTH, GPT2_BASE_HEADS = 768, 12

# GPT-2's causal-mask buffers, saved in state dicts by the transformers of 2021 and gone since.
_STALE_GPT2_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")

CONVERTED_CHECKPOINT = "clipcap.ckpt"
CONVERTED_LM = "lm"
CONVERTED_MAPPER = "mapper.safetensors"
CONVERTED_MODEL_CONFIG = "model.yaml"


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
        require_weight(weights, old_key, source, "the ClipCap MLP mapper", CLIPCAP_MAPPER_PREFIX)
    hidden_dim, clip_dim = shape_of(converted["net.0.weight"])
    out_dim, hidden_in = shape_of(converted["net.3.weight"])
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
        return require_weight(weights, key, source, "the ClipCap Transformer mapper", CLIPCAP_MAPPER_PREFIX)

    def put(new_key: str, value: torch.Tensor, old_key: str) -> None:
        converted[new_key] = value
        origin[new_key] = CLIPCAP_MAPPER_PREFIX + old_key

    linear = take("linear.weight")
    put("pooled_projection.weight", linear, "linear.weight")
    put("pooled_projection.bias", take("linear.bias"), "linear.bias")
    prefix_constants = take("prefix_const")
    put("prefix_constants", prefix_constants, "prefix_const")
    prefix_length, width = shape_of(prefix_constants)
    if width != lm_dim or linear.shape[0] % lm_dim:
        raise ValueError(
            f"{source}: the Transformer mapper's shapes (prefix_const {shape_of(prefix_constants)}, "
            f"linear.weight {shape_of(linear)}) do not fit GPT-2 width {lm_dim}"
        )
    if lm_dim % CLIPCAP_TRANSFORMER_HEADS:
        raise ValueError(f"{source}: GPT-2 width {lm_dim} is not divisible by ClipCap's 8 mapper heads")
    num_layers = layer_count(weights, "transformer.layers.", source)
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
    embeddings = require_weight(weights, "transformer.wte.weight", source, "GPT-2", CLIPCAP_LM_PREFIX)
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
        config = AutoConfig.from_pretrained(resolve_pretrained(lm))
        if not isinstance(config, GPT2Config):
            raise ValueError(f"--lm {lm} is a {config.model_type!r} model; ClipCap checkpoints hold a GPT-2")
        if n_head is not None:
            config.n_head = n_head
        return config
    embeddings = require_weight(weights, "transformer.wte.weight", source, "GPT-2", CLIPCAP_LM_PREFIX)
    positions = require_weight(weights, "transformer.wpe.weight", source, "GPT-2", CLIPCAP_LM_PREFIX)
    vocab_size, n_embd = shape_of(embeddings)
    if n_head is None:
        if n_embd != GPT2_BASE_WIDTH:
            raise ValueError(
                f"{source}: GPT-2 of width {n_embd} (not GPT-2 base's 768): pass its head count (--n_head) or "
                "its Hugging Face name or folder (--lm)"
            )
        n_head = GPT2_BASE_HEADS
    if n_embd % n_head:
        raise ValueError(f"{source}: n_head={n_head} does not divide the GPT-2 width {n_embd}")
    feed_forward = require_weight(
        weights, "transformer.h.0.mlp.c_fc.weight", source, "GPT-2", CLIPCAP_LM_PREFIX
    )
    inner = feed_forward.shape[1]  # GPT-2's Conv1D weights are (in, out)
    lm_head = weights.get("lm_head.weight")
    tied = lm_head is None or (lm_head.device.type != "meta" and torch.equal(lm_head, embeddings))
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=positions.shape[0],
        n_embd=n_embd,
        n_layer=layer_count(weights, "transformer.h.", source),
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
      (``clipcap fit --config lightning_configs/data/coco_karpathy.yaml --config lightning_configs/coco/ce.yaml
      --config out_dir/model.yaml``).

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
        f"# config: clipcap fit --config lightning_configs/data/coco_karpathy.yaml --config lightning_configs/coco/ce.yaml "
        f"--config {out_dir / CONVERTED_MODEL_CONFIG}\n"
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
        "pytorch-lightning_version": importlib.metadata.version("lightning"),  # without importing it
        "epoch": 0,
        "global_step": 0,
        "clipcap_frozen_lm": str(lm_dir),
        "clipcap_converted_from": original.source,
    }
    torch.save(checkpoint, staging / checkpoint_path.name)


def load_converted_mapper(path: str | Path) -> Mapper:
    """Rebuilds the mapper from the ``mapper.safetensors`` that :func:`write_converted_captioner` wrote."""
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
