"""The prefix language model: any Hugging Face ``AutoModelForCausalLM`` fed a prefix of embeddings.

Shapes: B batch, T token positions, D the LM's embedding size, V its vocabulary.
"""

from __future__ import annotations

import inspect
from functools import cached_property

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from clipcap.pretrained import resolve_pretrained

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PrefixLM(nn.Module):
    """A causal LM with its tokenizer, frozen or trained.

    A frozen LM keeps ``requires_grad=False`` on every parameter (so backward computes gradients for the
    prefix only, never for the LM's weights) and stays in eval mode whatever mode its parent is put in,
    so dropout does not perturb the features the mapper learns to match.

    Args:
        pretrained: a Hugging Face name, a local folder, or ``synthetic:lm``.
        trainable: finetune the LM's weights; False keeps it frozen.
        dtype: weights dtype, ``float32``, ``float16`` or ``bfloat16``.
        gradient_checkpointing: recompute activations in backward to save memory (trainable LMs).
    """

    def __init__(
        self,
        pretrained: str,
        trainable: bool = False,
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if dtype not in _DTYPES:
            raise ValueError(f"PrefixLM: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        path = resolve_pretrained(pretrained)
        self.pretrained = pretrained
        self.trainable = trainable
        try:
            self.model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype])
            self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"PrefixLM: cannot load a causal LM and its tokenizer from pretrained={pretrained!r}: {error}"
            ) from error
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"PrefixLM: the tokenizer of {pretrained!r} has no EOS token; captions need one")
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if not trainable:
            self.model.requires_grad_(False)
            self.model.eval()
        self._takes_logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def train(self, mode: bool = True) -> PrefixLM:
        super().train(mode)
        if not self.trainable:
            self.model.eval()
        return self

    @property
    def embed_dim(self) -> int:
        """The LM's input embedding size (D)."""
        return self.model.get_input_embeddings().embedding_dim

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

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
        kwargs = {}
        if logits_to_keep and self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        logits = self.model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False, **kwargs
        ).logits
        if logits_to_keep and logits.shape[1] != logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return logits

    @cached_property
    def period_token_ids(self) -> list[int]:
        """Ids of every vocabulary token whose text contains "." (DiscriTune stops after the first)."""
        vocab_size = len(self.tokenizer)
        texts = self.tokenizer.batch_decode([[i] for i in range(vocab_size)])
        special = set(self.tokenizer.all_special_ids)
        return [i for i, text in enumerate(texts) if "." in text and i not in special]
