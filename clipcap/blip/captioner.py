"""BLIP as a captioner: its text decoder cross-attends to cached vision features of its own (frozen) ViT.

``BlipForConditionalGeneration`` is a vision transformer and a BERT-style text decoder (causal
self-attention, cross-attention to the vision sequence, tied LM head). Here the vision half is frozen and
its outputs are cached like CLIP features (:class:`clipcap.blip.encoder.BlipImageEncoder`, ``clipcap
features --grid``); the captioner holds only the decoder and feeds it the cached sequence as
``encoder_hidden_states``, so it computes exactly what ``BlipForConditionalGeneration`` computes from the
pixels.

Token conventions are BLIP's: the decoder starts from ``[DEC]`` (the text config's ``bos_token_id``, put
where the processor's ``[CLS]`` would be), optionally followed by a prompt ("a picture of " in BLIP's COCO
finetuning), and a caption ends with ``[SEP]`` (``sep_token_id``, which BLIP's ``generate`` stops at); pad
is ``[PAD]`` (0). Captions and targets never include the start token or the prompt.

Shapes: B images, G + 1 vision tokens ([CLS] and G patches), D vision width, Q = 1 + prompt tokens
(the start), T caption tokens ([SEP] included), V vocabulary, R captions per image.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import nn
from transformers import AutoTokenizer, BlipTextLMHeadModel, PreTrainedTokenizerBase

from clipcap.blip.checkpoint import DTYPES, load_blip
from clipcap.captioner import Captioner, CaptionTokens, TeacherForcing
from clipcap.compat import enable_activation_checkpointing
from clipcap.generation import DecodingConfig, cut_at_stop
from clipcap.lm import period_token_ids
from clipcap.pretrained import resolve_pretrained


class BlipTextDecoder(nn.Module):
    """BLIP's text decoder (``BlipTextLMHeadModel``) with its tokenizer, trained or frozen.

    It is the captioner's ``lm``: ``CaptionModule`` leaves a frozen one out of checkpoints and reloads it
    from ``pretrained``. A frozen decoder keeps ``requires_grad=False`` and stays in eval mode.

    Args:
        pretrained: a BLIP captioning checkpoint (``Salesforce/blip-image-captioning-base`` or ``-large``,
            or a local folder); only its text decoder and tokenizer are kept.
        trainable: finetune the decoder (the default: it is the only part of a BLIP captioner that can
            train); False freezes it, e.g. to evaluate the pretrained model with ``validate``/``test``.
        dtype: weights dtype, ``float32``, ``float16`` or ``bfloat16``.
        gradient_checkpointing: recompute activations in backward to save memory.
    """

    def __init__(
        self,
        pretrained: str,
        trainable: bool = True,
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"BlipTextDecoder: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        path = resolve_pretrained(pretrained)
        self.pretrained = pretrained
        self.trainable = trainable
        # The vision half is dropped here: the captioner reads its cached outputs.
        self.model: BlipTextLMHeadModel = load_blip(path, dtype=DTYPES[dtype]).text_decoder
        try:
            self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"BlipTextDecoder: cannot load the tokenizer of {pretrained!r}: {error}"
            ) from error
        self._check_special_tokens()
        if gradient_checkpointing:
            enable_activation_checkpointing(self.model, use_reentrant=False)
        if trainable:
            # from_pretrained returns the model in eval mode, and Lightning keeps modes as it finds them:
            # a trained decoder follows its parent's mode (dropout on in training) like any module.
            self.model.train()
        else:
            self.model.requires_grad_(False)
            self.model.eval()

    def _check_special_tokens(self) -> None:
        config, tokenizer = self.model.config, self.tokenizer
        if config.bos_token_id is None or config.sep_token_id is None or config.pad_token_id is None:
            raise ValueError(
                f"BlipTextDecoder: {self.pretrained!r} has no bos/sep/pad token ids in its text config "
                f"(bos={config.bos_token_id}, sep={config.sep_token_id}, pad={config.pad_token_id})"
            )
        pairs = {
            "bos ([DEC])": (config.bos_token_id, tokenizer.bos_token_id),
            "sep ([SEP])": (config.sep_token_id, tokenizer.sep_token_id),
            "pad ([PAD])": (config.pad_token_id, tokenizer.pad_token_id),
        }
        for role, (model_id, tokenizer_id) in pairs.items():
            if tokenizer_id is not None and int(tokenizer_id) != int(model_id):
                raise ValueError(
                    f"BlipTextDecoder: the {role} token of {self.pretrained!r} is {model_id} in the text "
                    f"config but {tokenizer_id} in the tokenizer: they must come from the same checkpoint"
                )

    @property
    def trains(self) -> bool:
        """Whether any decoder weight trains."""
        return self.trainable

    def train(self, mode: bool = True) -> BlipTextDecoder:
        super().train(mode)
        if not self.trainable:
            self.model.eval()
        return self

    def frozen_state_keys(self) -> list[str]:
        """Keys of this module's state dict that never train (all of them when frozen): checkpoints leave
        them out and ``pretrained`` restores them."""
        return [] if self.trainable else list(self.state_dict())

    @property
    def encoder_dim(self) -> int:
        """D, the width of the vision states the decoder cross-attends to."""
        return int(self.model.config.encoder_hidden_size)

    @property
    def bos_token_id(self) -> int:
        """``[DEC]``: every caption is decoded after it."""
        return int(self.model.config.bos_token_id)

    @property
    def eos_token_id(self) -> int:
        """``[SEP]``, the token BLIP ends captions with."""
        return int(self.model.config.sep_token_id)

    @property
    def pad_token_id(self) -> int:
        return int(self.model.config.pad_token_id)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @cached_property
    def period_token_ids(self) -> list[int]:
        """Ids of every vocabulary token whose text contains "." (DiscriTune stops after the first)."""
        return period_token_ids(self.tokenizer)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_states: torch.Tensor,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Runs the decoder on token ids, cross-attending to the image.

        Args:
            input_ids: (B, L) ids, the start first.
            attention_mask: (B, L), 1 on real tokens.
            image_states: (B, G + 1, D) the vision sequence.
            logits_to_keep: if > 0, logits for the last this many positions only.

        Returns:
            (B, L', V) logits, L' = ``logits_to_keep`` or L.
        """
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_states,
            use_cache=False,
            logits_to_keep=logits_to_keep,
        ).logits


class BlipCaptioner(Captioner):
    """BLIP's text decoder reading cached BLIP vision features: a :class:`~clipcap.captioner.Captioner`
    that ``CrossEntropy`` and ``DiscriTune`` train as they train ``ClipCaptioner``.

    Its input, ``batch.clip_features``, must be the grid features of the same BLIP checkpoint's vision
    encoder, (B, G + 1, D): extract them with ``clipcap features --grid`` with ``data.init_args.clip_model``
    naming the BLIP checkpoint, and train with ``data.init_args.grid_features: true``. Pooled (B, D)
    features are refused: the [CLS] token alone is not what the decoder was trained to read.

    Args:
        decoder: the text decoder (its checkpoint must be the one the features were extracted with).
        prompt: text every caption is decoded after and scored after, never part of the caption: BLIP
            finetuned its COCO captioner with "a picture of "; "" (the default) decodes from ``[DEC]``
            alone, as ``BlipForConditionalGeneration.generate`` does without text.
        max_caption_tokens: training targets are cut to this many tokens, ``[SEP]`` included.
        clip_dim: the data's feature size, linked from the data by the CLI (``data.clip_dim``); when given it
            must be the decoder's cross-attention width D. None takes D.
    """

    def __init__(
        self,
        decoder: BlipTextDecoder,
        prompt: str = "",
        max_caption_tokens: int = 40,
        clip_dim: int | None = None,
    ) -> None:
        super().__init__()
        if max_caption_tokens < 2:
            raise ValueError(f"max_caption_tokens must be ≥ 2 (a token and [SEP]), got {max_caption_tokens}")
        self.lm = decoder
        self.clip_dim = decoder.encoder_dim
        if clip_dim is not None and clip_dim != self.clip_dim:
            raise ValueError(
                f"BlipCaptioner: the data's image features have size {clip_dim}, but the BLIP decoder of "
                f"{decoder.pretrained!r} cross-attends to {self.clip_dim}-d vision states: extract the "
                "features with that BLIP checkpoint (data.init_args.clip_model) and `clipcap features --grid`"
            )
        self.prompt = prompt
        self.max_caption_tokens = max_caption_tokens
        prompt_ids = (
            decoder.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt.strip() else []
        )
        # Not saved: it is rebuilt from the prompt, and moves with the module.
        self.register_buffer(
            "start_ids", torch.tensor([decoder.bos_token_id, *prompt_ids], dtype=torch.long), persistent=False
        )

    @property
    def device(self) -> torch.device:
        return self.lm.model.get_input_embeddings().weight.device

    def image_states(self, clip_features: torch.Tensor) -> torch.Tensor:
        """Cached BLIP grid features (B, G + 1, D) → the decoder's ``encoder_hidden_states``, checked."""
        if clip_features.dim() != 3:
            raise ValueError(
                "BlipCaptioner reads the BLIP vision encoder's whole output sequence, (B, G + 1, D) grid "
                f"features, but got features of shape {tuple(clip_features.shape)}: set "
                "data.init_args.grid_features=true, with features extracted by `clipcap features --grid` "
                "from the BLIP checkpoint"
            )
        if clip_features.shape[-1] != self.clip_dim:
            raise ValueError(
                f"BlipCaptioner: the features have size {clip_features.shape[-1]} but the decoder "
                f"cross-attends to {self.clip_dim}-d states: they must come from the same BLIP checkpoint"
            )
        return clip_features.to(device=self.device, dtype=self.lm.dtype)

    def encode_captions(self, captions: list[str]) -> CaptionTokens:
        """Tokenizes target captions: no start token or prompt, ``[SEP]`` appended, cut to
        ``max_caption_tokens``, padded with ``[PAD]``."""
        encoded = self.tokenizer(list(captions), add_special_tokens=False)["input_ids"]
        eos = self.lm.eos_token_id
        rows = [ids[: self.max_caption_tokens - 1] + [eos] for ids in encoded]
        return CaptionTokens.from_rows(rows, self.lm.pad_token_id, self.device)

    def forward(self, clip_features: torch.Tensor, captions: CaptionTokens) -> TeacherForcing:
        """Teacher forcing: ``logits[:, t]`` predicts caption token t from the start, the prompt and tokens
        before t. The decoder reads ``[start ; caption[:-1]]``: the last caption token predicts nothing."""
        states = self.image_states(clip_features)
        batch, length = captions.input_ids.shape
        start = self.start_ids.expand(batch, -1)
        input_ids = torch.cat([start, captions.input_ids[:, :-1]], dim=1)
        attention_mask = torch.cat([torch.ones_like(start), captions.attention_mask[:, :-1]], dim=1)
        logits = self.lm(input_ids, attention_mask, states, logits_to_keep=length)
        return TeacherForcing(logits=logits, labels=captions.labels)

    @torch.no_grad()
    def generate_ids(
        self, clip_features: torch.Tensor, decoding: DecodingConfig | None = None, keep_mode: bool = False
    ) -> list[list[int]]:
        """Decodes caption ids with ``generate`` (greedy, beam search or sampling, KV-cached), B·R lists
        (image-major), each cut after its stop: ``[SEP]`` dropped, a "." stop kept; the start and the prompt
        are not part of them. In eval mode, or with ``keep_mode`` in the current one (dropout on in
        training)."""
        decoding = decoding or DecodingConfig()
        states = self.image_states(clip_features)
        start = self.start_ids.repeat(states.shape[0], 1)
        if decoding.num_beams > 1 and decoding.beam_ranking == "clipcap":
            raise ValueError(
                "BlipCaptioner: beam_ranking=clipcap is the original ClipCap's; BLIP decodes with generate's"
            )
        stops = self.stop_ids(decoding)
        was_training = self.training
        if not keep_mode:
            self.eval()
        try:
            generated = self.lm.model.generate(
                input_ids=start,
                attention_mask=torch.ones_like(start),
                encoder_hidden_states=states,
                generation_config=decoding.generation_config(stops, self.lm.pad_token_id),
            )
        finally:
            self.train(was_training)
        return cut_at_stop(generated[:, start.shape[1] :], self.lm.eos_token_id, stops)

    def extra_repr(self) -> str:
        return f"prompt={self.prompt!r}, max_caption_tokens={self.max_caption_tokens}"
