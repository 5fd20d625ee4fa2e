"""The prefix language model: any Hugging Face ``AutoModelForCausalLM`` fed a prefix of embeddings.

Shapes: B batch, T token positions, D the LM's embedding size, V its vocabulary.
"""

from __future__ import annotations

import inspect
import os
from functools import cached_property

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

from clipcap.compat import enable_activation_checkpointing
from clipcap.lora import LoraSettings, apply_lora, is_adapter_key
from clipcap.pretrained import resolve_pretrained

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_QUANTIZATIONS = ("8bit", "4bit")


class PrefixLM(nn.Module):
    """A causal LM with its tokenizer: frozen, finetuned, or adapted with LoRA.

    A frozen LM keeps ``requires_grad=False`` on every parameter (so backward computes gradients for the
    prefix only, never for the LM's weights) and stays in eval mode whatever mode its parent is put in,
    so dropout does not perturb the features the mapper learns to match. With ``lora`` the base weights
    are frozen the same way and only the adapters train (the LM then follows its parent's mode, so the
    adapters' dropout is active in training); checkpoints hold the adapters, never the base.

    Args:
        pretrained: a Hugging Face name, a local folder, or ``synthetic:lm``.
        trainable: finetune all of the LM's weights; False keeps them frozen (LoRA adapters still train).
        dtype: weights dtype, ``float32``, ``float16`` (V100) or ``bfloat16`` (A100 and later).
        gradient_checkpointing: recompute the LM's activations in backward to save memory (trained or
            LoRA-adapted LMs).
        lora: LoRA settings (peft); the base stays frozen. Not with ``trainable``.
        quantization: load the frozen base in ``8bit`` or ``4bit`` (NF4) through bitsandbytes (the
            optional ``quantization`` extra; CUDA only). Not with ``trainable``.
        compile: run the teacher-forced forward pass (cross-entropy, DiscriTune's log π, the KL terms)
            through ``torch.compile``: True with ``dynamic=True`` (caption lengths vary by batch), or a dict
            of ``torch.compile`` arguments (``mode: max-autotune``, ``backend``, ...). Decoding and the
            Gumbel rollout, which grow a KV cache step by step, stay eager. The first batches of each new
            shape pay the compilation.
    """

    def __init__(
        self,
        pretrained: str,
        trainable: bool = False,
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        lora: LoraSettings | None = None,
        quantization: str | None = None,
        compile: bool | dict = False,
    ) -> None:
        super().__init__()
        if dtype not in _DTYPES:
            raise ValueError(f"PrefixLM: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        _check_options(trainable, lora, quantization)
        path = resolve_pretrained(pretrained)
        loading = _quantization_kwargs(quantization, _DTYPES[dtype])
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype], **loading)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"PrefixLM: cannot load a causal LM and its tokenizer from pretrained={pretrained!r}: {error}"
            ) from error
        self._setup(model, tokenizer, pretrained, trainable, gradient_checkpointing, lora, quantization)
        self._compile(compile)

    @classmethod
    def from_model(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        name: str = "in-memory",
        trainable: bool = False,
        gradient_checkpointing: bool = False,
        lora: LoraSettings | None = None,
        compile: bool | dict = False,
    ) -> PrefixLM:
        """A ``PrefixLM`` around a model already in memory (benchmarks, tests), set up exactly as one loaded
        from ``pretrained``. It has no source to reload a frozen base from, so checkpoints that leave the
        frozen weights out cannot be restored from it; ``name`` only labels it."""
        _check_options(trainable, lora, None)
        lm = cls.__new__(cls)
        nn.Module.__init__(lm)
        lm._setup(model, tokenizer, name, trainable, gradient_checkpointing, lora, None)
        lm._compile(compile)
        return lm

    def _compile(self, compile: bool | dict) -> None:
        if not isinstance(compile, (bool, dict)):
            raise ValueError(
                f"PrefixLM: compile must be true/false or a dict of torch.compile arguments, got {compile!r}"
            )
        options = ({"dynamic": True} if compile is True else dict(compile)) if compile else None
        # A plain attribute, not a submodule: the compiled function wraps self.model, whose weights (and
        # state-dict keys) stay where they are.
        self._compiled_logits = torch.compile(self._logits, **options) if options is not None else None

    def _setup(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        pretrained: str,
        trainable: bool,
        gradient_checkpointing: bool,
        lora: LoraSettings | None,
        quantization: str | None,
    ) -> None:
        self.pretrained = pretrained
        self.trainable = trainable
        self.lora = lora
        self.quantization = quantization
        self.model: PreTrainedModel = model
        self.tokenizer: PreTrainedTokenizerBase = tokenizer
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"PrefixLM: the tokenizer of {pretrained!r} has no EOS token; captions need one")
        fuse_tanh_gelu(self.model)
        # Asked of the model itself, before any LoRA wrapper (whose forward takes **kwargs).
        self.takes_logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        if gradient_checkpointing:
            # Non-reentrant: the frozen base's inputs need not require gradients for the prefix's to flow.
            enable_activation_checkpointing(self.model, use_reentrant=False)
        if not trainable:
            self.model.requires_grad_(False)
        if lora is not None:
            self.model = apply_lora(self.model, lora, pretrained)
        # from_pretrained returns a model in eval mode, and Lightning keeps each submodule's mode: a trained
        # LM must start in training mode (dropout on, as when finetuning), and then follows its parent.
        self.model.train(self.trains)

    @property
    def checkpointing(self) -> bool:
        """Whether any layer has Hugging Face gradient checkpointing on, which drops the KV cache in
        training mode."""
        return any(
            getattr(module, "gradient_checkpointing", False) is True for module in self.model.modules()
        )

    @property
    def trains(self) -> bool:
        """Whether any LM weight trains: the whole LM, or its LoRA adapters."""
        return self.trainable or self.lora is not None

    def train(self, mode: bool = True) -> PrefixLM:
        super().train(mode)
        if not self.trains:
            self.model.eval()
        return self

    def frozen_state_keys(self) -> list[str]:
        """Keys of this module's state dict that never train: all of them for a frozen LM, the base model's
        under LoRA, none when the LM is finetuned. Checkpoints leave them out; the pretrained source
        restores them."""
        if self.trainable:
            return []
        return [key for key in self.state_dict() if not is_adapter_key(key)]

    @property
    def base_model(self) -> PreTrainedModel:
        """The Hugging Face model under the LoRA wrapper (the model itself without LoRA)."""
        return self.model.get_base_model() if self.lora is not None else self.model

    @property
    def embed_dim(self) -> int:
        """The LM's input embedding size (D)."""
        return self.model.get_input_embeddings().embedding_dim

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @cached_property
    def convention_bos_token_id(self) -> int | None:
        """The BOS id the tokenizer starts every encoded text with (LLaMA's ``<s>``), or None when it adds
        none (GPT-2, whose ``<|endoftext|>`` is its BOS in name only)."""
        bos = self.tokenizer.bos_token_id
        if bos is None:
            return None
        encoded = self.tokenizer("a").input_ids
        return int(bos) if encoded and encoded[0] == bos else None

    @property
    def pad_token_id(self) -> int:
        """The id used to fill padded positions; they are masked, so any id works (GPT-2 has no pad)."""
        pad = self.tokenizer.pad_token_id
        return self.eos_token_id if pad is None else int(pad)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) → input embeddings (B, T, D)."""
        return self.model.get_input_embeddings()(input_ids)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Runs the LM on embeddings.

        Args:
            inputs_embeds: (B, T, D) input embeddings.
            attention_mask: (B, T), 1 for real positions.
            logits_to_keep: if > 0, logits only for the last this many positions (saves the LM head's
                work on prefix positions, which have no targets).

        Returns:
            (B, T', V) logits, T' = ``logits_to_keep`` or T.
        """
        run = self._compiled_logits or self._logits
        return run(inputs_embeds, attention_mask, logits_to_keep)

    def _logits(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, logits_to_keep: int
    ) -> torch.Tensor:
        kwargs = {}
        length = inputs_embeds.shape[1]
        if 0 < logits_to_keep < length and self.takes_logits_to_keep:
            # The positions as a tensor, not a count: transformers then gathers the hidden states into a
            # contiguous tensor, and the LM head is one matrix product. Given a count, it slices them
            # (non-contiguous), and on CPU the head falls back to one small product per row, about twice as
            # slow forward and backward (docs/benchmarks.md, "LM head").
            kwargs["logits_to_keep"] = torch.arange(
                length - logits_to_keep, length, device=inputs_embeds.device
            )
        logits = self.model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False, **kwargs
        ).logits
        if logits_to_keep and logits.shape[1] != logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return logits

    @cached_property
    def period_token_ids(self) -> list[int]:
        """Ids of every vocabulary token whose text contains "." (DiscriTune stops after the first)."""
        return period_token_ids(self.tokenizer)


def period_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of every vocabulary token whose text contains ".", special tokens excepted: the stops of
    ``stop_at_period`` decoding, for any tokenizer (byte-level BPE, SentencePiece, WordPiece)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    special = set(tokenizer.all_special_ids)
    return [i for i, text in enumerate(texts) if "." in text and i not in special]


def fuse_tanh_gelu(model: nn.Module) -> int:
    """Replaces the tanh approximation of GELU written as Python arithmetic (GPT-2's ``gelu_new``, also
    GPT-J's, GPT-Neo's, CodeGen's; ``gelu_fast``) with ``F.gelu(approximate="tanh")``, the same function in
    one kernel, in place.

    The Python version runs seven elementwise operations, each writing a (B, T, 4·D) tensor and keeping
    several for backward; with the fused one a GPT-2-small forward + backward at batch 32 × 30 went from
    7.36 s to 7.08 s on CPU (docs/benchmarks.md). Outputs agree to float rounding (2.4e-7 at most in
    float32). The model's config is untouched, so a saved or exported model is the original architecture.

    Returns:
        How many activation modules were replaced.
    """
    replaced = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(module, name, GELUTanh())
                replaced += 1
    return replaced


def _check_options(trainable: bool, lora: LoraSettings | None, quantization: str | None) -> None:
    if trainable and lora is not None:
        raise ValueError(
            "PrefixLM: trainable=true finetunes every LM weight and lora adds adapters to a frozen base; "
            "choose one"
        )
    if trainable and quantization is not None:
        raise ValueError("PrefixLM: a quantized base cannot be finetuned; use lora with quantization")


def _quantization_kwargs(quantization: str | None, dtype: torch.dtype) -> dict:
    """``from_pretrained`` options that load the base in 8 or 4 bits, or none."""
    if quantization is None:
        return {}
    if quantization not in _QUANTIZATIONS:
        raise ValueError(
            f"PrefixLM: quantization must be one of {_QUANTIZATIONS} or null, got {quantization!r}"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError(
            f"PrefixLM: quantization={quantization!r} needs bitsandbytes, an optional extra: "
            "pip install 'clipcap[quantization]' (CUDA only)"
        ) from None
    if not torch.cuda.is_available():
        raise ValueError(f"PrefixLM: quantization={quantization!r} needs a CUDA device; none is available")

    if quantization == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16,
        )
    # Quantized weights are placed on the device at load time (bitsandbytes quantizes on the GPU): under
    # DDP the model is built before Lightning sets each process's device, so the process's own GPU is
    # read from LOCAL_RANK (set by the launcher), not from the current device (cuda:0 then, for every rank).
    device = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
    return {"quantization_config": config, "device_map": {"": device}}
