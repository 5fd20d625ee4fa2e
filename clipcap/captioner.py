"""The captioner: CLIP features → mapper → prefix → causal LM → captions.

``Captioner`` is what objectives, ``CaptionModule`` and the callbacks use of any captioner;
``ClipCaptioner`` (here) and ``clipcap.blip.BlipCaptioner`` implement it.

Shapes: B images, D_clip CLIP feature size (or (G, D_clip) grid features), P prefix length, T caption
tokens (EOS included), D LM width, V vocabulary, R captions per image.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from clipcap.compat import cache_kwargs, generate_with_gradients
from clipcap.generation import BEAM_RANKINGS, CAPTION_ENDS, DecodingConfig, clipcap_beam_search, cut_at_stop
from clipcap.kv_cache import decoding_cache
from clipcap.lm import PrefixLM
from clipcap.mapper import Mapper, MapperFactory, MLPMapper


@dataclass
class CaptionTokens:
    """Tokenized target captions.

    Attributes:
        input_ids: (B, T) caption ids, EOS-terminated, padded with the LM's pad id.
        attention_mask: (B, T) 1 on caption tokens (EOS included), 0 on padding.
        labels: (B, T) the targets: ``input_ids`` with padding set to -100. Padding is found from the
            lengths, never by comparing ids with the pad id, so a real token that shares the pad id
            (GPT-2's EOS, or "!" in the original ClipCap's pad-0 scheme) is still a target.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_rows(
        cls, rows: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str = "cpu"
    ) -> CaptionTokens:
        """Right-pads token id rows (each already EOS-terminated, or however the caller wants them).

        Args:
            rows: B non-empty lists of ids.
            pad_token_id: the id written on padding (masked, and labelled -100).
            device: where the tensors go.
        """
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return cls(input_ids.to(device), attention_mask.to(device), labels.to(device))


@dataclass
class TeacherForcing:
    """Teacher-forced LM outputs on caption positions.

    Attributes:
        logits: (B, T, V); ``logits[:, t]`` predicts caption token t (the first from the last prefix
            position). Prefix positions have no targets, so their logits are not computed at all, which
            is what -100 labels on the prefix would mean, without the wasted LM-head work.
        labels: (B, T) targets, -100 on padding.
    """

    logits: torch.Tensor
    labels: torch.Tensor


class Captioner(nn.Module, ABC):
    """What objectives, ``CaptionModule`` and the callbacks use of a captioner.

    ``clip_features`` below are the image features the data serves (``batch.clip_features``): (B, D_clip)
    pooled or (B, G, D_clip) grid, from whichever frozen image encoder the features were cached with.

    Attributes:
        lm: the language model that writes the captions, an ``nn.Module`` with ``tokenizer``,
            ``eos_token_id`` (the stop), ``pad_token_id``, ``period_token_ids`` (see
            :func:`clipcap.generation.stop_token_ids`), ``trainable``, ``trains``, ``pretrained`` and
            ``frozen_state_keys()``: ``CaptionModule`` leaves those weights out of checkpoints and reloads
            them from ``pretrained``.
        clip_dim: the image feature size (D_clip) the captioner reads; checked against the data's.
    """

    lm: nn.Module
    clip_dim: int

    @property
    def tokenizer(self) -> Any:
        """The tokenizer of the captions (``lm``'s)."""
        return self.lm.tokenizer

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where the trained weights are."""

    @abstractmethod
    def encode_captions(self, captions: list[str]) -> CaptionTokens:
        """Tokenizes target captions: EOS-terminated, padded, -100 labels on padding."""

    @abstractmethod
    def forward(self, clip_features: torch.Tensor, captions: CaptionTokens) -> TeacherForcing:
        """Teacher forcing: ``logits[:, t]`` predicts caption token t given the image and tokens < t."""

    @abstractmethod
    def generate_ids(
        self, clip_features: torch.Tensor, decoding: DecodingConfig | None = None, keep_mode: bool = False
    ) -> list[list[int]]:
        """Decodes caption token ids, B·R lists (image-major), each cut after its stop
        (:func:`clipcap.generation.cut_at_stop`): EOS is dropped, a "." stop is kept."""

    def stop_ids(self, decoding: DecodingConfig) -> list[int]:
        """The ids that end this captioner's captions under ``decoding``."""
        return decoding.stop_ids(self.lm)

    def generate(
        self, clip_features: torch.Tensor, decoding: DecodingConfig | None = None
    ) -> list[list[str]]:
        """Decodes captions: B lists of R strings."""
        decoding = decoding or DecodingConfig()
        ids = self.generate_ids(clip_features, decoding)
        texts = [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        per_image = decoding.num_return_sequences
        return [texts[i : i + per_image] for i in range(0, len(texts), per_image)]


class ClipCaptioner(Captioner):
    """Mapper + prefix LM + the LM's tokenizer.

    Args:
        language_model: the prefix LM (its tokenizer is the captioner's).
        mapper: a mapper class with its options, called as ``mapper(clip_dim, lm_dim)``; an
            ``MLPMapper`` with prefix length 10 when None.
        clip_dim: the CLIP feature size the mapper takes (D_clip); must match the data's features.
        max_caption_tokens: training targets are cut to this many tokens, EOS included, so one long
            outlier caption cannot set the padded length of every batch.
        normalize_clip_features: L2-normalise CLIP features before the mapper.
        bos: put the LM's BOS token before the prefix, in training, generation, the Gumbel rollout and the
            KL reference alike. None follows the tokenizer's convention: LLaMA's starts every text with
            ``<s>`` (as LLaVA, MiniGPT-4 and BLIP-2 feed it), GPT-2's with nothing (as ClipCap does); True
            or False decides.
        caption_end: how this captioner's captions end, a fact of its training that every decoding follows
            (``DecodingConfig.stop_at_period`` adds the "."-holding tokens on top): ``eos`` (trained by
            clipcap, targets end with EOS); ``period_token`` (the original ClipCap, whose targets had no
            EOS: a caption ends after the "." token, as its ``generate2``/``generate_beam`` stop, and EOS is
            an ordinary token); ``eos_or_period`` (EGG's DiscriTune: EOS or any token holding ".").
            ``clipcap convert`` sets it for the checkpoints it converts.
        beam_ranking: the beam ranking of decodings that do not choose one (``DecodingConfig.beam_ranking``):
            ``transformers``, or ``clipcap`` for a converted ClipCap checkpoint (its ``generate_beam``).
    """

    def __init__(
        self,
        language_model: PrefixLM,
        mapper: MapperFactory | None = None,
        clip_dim: int = 512,
        max_caption_tokens: int = 40,
        normalize_clip_features: bool = False,
        bos: bool | None = None,
        caption_end: str = "eos",
        beam_ranking: str = "transformers",
    ) -> None:
        super().__init__()
        if max_caption_tokens < 2:
            raise ValueError(f"max_caption_tokens must be ≥ 2 (a token and EOS), got {max_caption_tokens}")
        self.lm = language_model
        factory = mapper if mapper is not None else MLPMapper
        self.mapper: Mapper = factory(clip_dim, language_model.embed_dim)
        self.clip_dim = clip_dim
        self.max_caption_tokens = max_caption_tokens
        self.normalize_clip_features = normalize_clip_features
        self.bos = bos
        self.bos_token_id = self._bos_token_id(bos)
        if caption_end not in CAPTION_ENDS:
            raise ValueError(f"ClipCaptioner: caption_end must be one of {CAPTION_ENDS}, got {caption_end!r}")
        if beam_ranking not in BEAM_RANKINGS:
            raise ValueError(
                f"ClipCaptioner: beam_ranking must be one of {BEAM_RANKINGS}, got {beam_ranking!r}"
            )
        self.caption_end = caption_end
        self.beam_ranking = beam_ranking

    def _bos_token_id(self, bos: bool | None) -> int | None:
        if bos is None:
            return self.lm.convention_bos_token_id
        if not bos:
            return None
        if self.lm.tokenizer.bos_token_id is None:
            raise ValueError(
                f"ClipCaptioner(bos=True): the tokenizer of {self.lm.pretrained!r} has no BOS token"
            )
        return int(self.lm.tokenizer.bos_token_id)

    @property
    def prefix_length(self) -> int:
        return self.mapper.prefix_length

    @property
    def device(self) -> torch.device:
        return next(self.mapper.parameters()).device

    def prefix(self, clip_features: torch.Tensor) -> torch.Tensor:
        """CLIP features (B, D_clip) or (B, G, D_clip) → what the LM reads before the caption, in its dtype:
        (B, P, D) prefix embeddings, or (B, 1 + P, D) with the BOS embedding first (``bos``)."""
        if clip_features.shape[-1] != self.clip_dim:
            raise ValueError(
                f"CLIP features have size {clip_features.shape[-1]} but the mapper was built for "
                f"model.captioner.clip_dim={self.clip_dim}"
            )
        features = clip_features.to(next(self.mapper.parameters()).dtype)
        if self.normalize_clip_features:
            features = F.normalize(features, dim=-1)
        prefix = self.mapper(features).to(self.lm.dtype)
        if self.bos_token_id is None:
            return prefix
        bos = self.lm.embed(torch.tensor([[self.bos_token_id]], device=prefix.device)).to(prefix.dtype)
        return torch.cat([bos.expand(prefix.shape[0], -1, -1), prefix], dim=1)

    def encode_captions(self, captions: list[str]) -> CaptionTokens:
        """Tokenizes target captions: no BOS, EOS appended, cut to ``max_caption_tokens``, padded."""
        encoded = self.tokenizer(list(captions), add_special_tokens=False)["input_ids"]
        eos = self.lm.eos_token_id
        rows = [ids[: self.max_caption_tokens - 1] + [eos] for ids in encoded]
        return CaptionTokens.from_rows(rows, self.lm.pad_token_id, self.device)

    def forward(self, clip_features: torch.Tensor, captions: CaptionTokens) -> TeacherForcing:
        """Teacher forcing: logits for every caption token given the prefix and the tokens before it."""
        prefix = self.prefix(clip_features)
        # Positions P-1 .. P+T-2 predict caption tokens 0 .. T-1. The last caption token predicts nothing
        # and, the LM being causal, changes no earlier position's output: it is not fed at all, so the
        # logits kept are exactly the T needed, contiguous (slicing off a last one would copy all of them
        # for the loss's reshape).
        embeds = torch.cat([prefix, self.lm.embed(captions.input_ids[:, :-1])], dim=1)
        prefix_mask = captions.attention_mask.new_ones(prefix.shape[:2])
        attention_mask = torch.cat([prefix_mask, captions.attention_mask[:, :-1]], dim=1)
        logits = self.lm(embeds, attention_mask, logits_to_keep=captions.input_ids.shape[1])
        return TeacherForcing(logits=logits, labels=captions.labels)

    @torch.no_grad()
    def generate_ids(
        self, clip_features: torch.Tensor, decoding: DecodingConfig | None = None, keep_mode: bool = False
    ) -> list[list[int]]:
        """Decodes caption token ids, B·R lists (image-major), each cut after its stop.

        EOS is dropped; a "." stop (``stop_at_period``) is kept as caption text. Decoding runs in eval mode,
        or with ``keep_mode`` in the current one (dropout on in training: how EGG decodes DiscriTune's
        training captions).
        """
        decoding = decoding or DecodingConfig()
        prefix = self.prefix(clip_features)
        was_training = self.training
        if not keep_mode:
            self.eval()
        try:
            if decoding.num_beams > 1 and (decoding.beam_ranking or self.beam_ranking) == "clipcap":
                stops = self.stop_ids(decoding)
                generated = clipcap_beam_search(self.lm, prefix, decoding, stops)
            else:
                generated, stops = self._generate(self.lm.model.generate, prefix, decoding)
        finally:
            self.train(was_training)
        return cut_at_stop(generated, self.lm.eos_token_id, stops)

    def stop_ids(self, decoding: DecodingConfig) -> list[int]:
        """The ids that end this captioner's captions under ``decoding`` (see ``caption_end``)."""
        return decoding.stop_ids(self.lm, self.caption_end)

    def rollout_with_logits(
        self, clip_features: torch.Tensor, decoding: DecodingConfig
    ) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
        """Decodes as :meth:`generate_ids` does, but in the current mode (dropout on in training) and with
        gradients, keeping each step's logits: a REINFORCE objective reads log π of the captions from the
        pass that chose them instead of running them through the LM again (an option of clipcap's: EGG's
        ``emergent_captioner`` decodes without gradients, then runs the teacher-forced pass).

        Returns:
            The B·R caption id lists (cut after their stops, as ``generate_ids``), the (B·R, T) generated
            ids, stops included, and the (B·R, T, V) raw logits of each step (before any logits processor),
            ``logits[:, t]`` predicting ``ids[:, t]``, with gradients to the mapper and the trained LM.
        """
        if decoding.num_beams > 1 and (decoding.beam_ranking or self.beam_ranking) == "clipcap":
            raise ValueError(
                "rollout_with_logits: ClipCap's beam ranking has no logits to keep; use generate's"
            )
        if decoding.kv_cache == "static":
            raise ValueError(
                "rollout_with_logits: kv_cache=static writes the cache in place, where autograd keeps each "
                "step's keys; use kv_cache=preallocated (rollouts with gradients use transformers' "
                "DynamicCache) or dynamic"
            )
        if self.lm.checkpointing and self.training:
            raise ValueError(
                "rollout_with_logits: the LM has gradient checkpointing on, which drops the KV cache in "
                "training mode (every step would re-run the whole sequence); turn it off or score the "
                "captions with a separate teacher-forced pass"
            )
        # Under LoRA the adapters live inside the base model, and peft's own generate would not undecorate.
        generate = generate_with_gradients(self.lm.base_model)
        output, stops = self._generate(
            generate, self.prefix(clip_features), decoding, output_logits=True, return_dict_in_generate=True
        )
        logits = torch.stack(output.logits, dim=1)
        return cut_at_stop(output.sequences, self.lm.eos_token_id, stops), output.sequences, logits

    def _generate(
        self, generate: Callable[..., Any], prefix: torch.Tensor, decoding: DecodingConfig, **settings: Any
    ) -> tuple[Any, list[int]]:
        """Runs ``generate`` (transformers' ``generate``, decorated or not) from the (B, P, D) prefix with
        ``decoding``'s settings and any further ``GenerationConfig`` ``settings``, the prefix's cache shared
        among each image's beams; returns its output and the stop ids."""
        stops = self.stop_ids(decoding)
        config = decoding.generation_config(stops, self.lm.pad_token_id)
        unknown = config.update(**settings)
        if unknown:
            raise ValueError(f"_generate: not GenerationConfig settings: {sorted(unknown)}")
        attention_mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        output = generate(
            inputs_embeds=prefix,
            attention_mask=attention_mask,
            **cache_kwargs(self._starting_cache(prefix, attention_mask, decoding)),
            generation_config=config,
        )
        return output, stops

    def _starting_cache(
        self, prefix: torch.Tensor, attention_mask: torch.Tensor, decoding: DecodingConfig
    ) -> DynamicCache | None:
        """The KV cache ``generate`` starts from, or None to let it make its own.

        By default and without gradients (decoding, a REINFORCE rollout) it is a
        :func:`~clipcap.kv_cache.decoding_cache` sized for the prefix and ``max_new_tokens``, written in
        place instead of grown by concatenation. With gradients (``rollout_with_logits``) or
        ``kv_cache: dynamic``, transformers' ``DynamicCache``: autograd keeps each step's keys, which
        in-place writes would overwrite. With ``kv_cache: static``, none: ``generate`` builds its
        ``StaticCache``, which cannot be repeated per beam.

        When an image decodes several sequences (beams, sampled captions), the cache holds the first P − 1
        prefix positions, computed once per image and repeated for each sequence: ``generate`` copies its
        inputs once per beam before the first forward pass, so beam search ran the same prefix through the
        LM num_beams times; given this cache it runs only the last prefix position per sequence. The
        captions are the same.
        """
        if decoding.kv_cache == "static":
            return None
        copies = decoding.num_beams if decoding.num_beams > 1 else decoding.num_return_sequences
        shared = copies > 1 and prefix.shape[1] > 1
        config = self.lm.base_model.config
        if torch.is_grad_enabled() or decoding.kv_cache == "dynamic":
            if not shared:
                return None
            cache = DynamicCache(config=config)
        else:
            cache = decoding_cache(config, capacity=prefix.shape[1] + decoding.max_new_tokens)
            if not shared:
                return cache
        self.lm.model(
            inputs_embeds=prefix[:, :-1],
            attention_mask=attention_mask[:, :-1],
            **cache_kwargs(cache),
            use_cache=True,
            **({"logits_to_keep": 1} if self.lm.takes_logits_to_keep else {}),
        )
        cache.batch_repeat_interleave(copies)
        return cache
