"""The frozen, un-prefixed language model that KL terms compare the captioner's LM against."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from clipcap.captioner import Captioner
from clipcap.frozen import keep_unregistered
from clipcap.lm import PrefixLM


def check_reference_lm(captioner: Captioner, owner: str) -> None:
    """Raises unless the captioner has an un-prefixed LM to compare with: a ``PrefixLM`` (GPT-2, LLaMA...)
    is a language model with or without the image prefix; BLIP's text decoder has no such reference, since
    it was only ever trained cross-attending to an image.

    Args:
        captioner: the captioner being trained.
        owner: who asks, for the message (e.g. ``"DiscriTune: kl_coefficient > 0"``).
    """
    if not isinstance(captioner.lm, PrefixLM):
        raise ValueError(
            f"{owner} needs the captioner's language model without its image prefix as the KL reference, "
            f"which {type(captioner).__name__} does not have ({type(captioner.lm).__name__} was trained "
            "only with an image to attend to: without one it is no language model); set kl_coefficient to 0"
        )


def reference_lm(owner: nn.Module, captioner: Captioner) -> PrefixLM:
    """The pretrained LM, frozen: the captioner's own LM when it is frozen (its weights never move), the
    same LM with its adapters switched off under LoRA (no second copy of a 7B base), else a second copy
    loaded from the same pretrained source once and kept on ``owner``.

    The copy is held outside the module tree (:func:`~clipcap.frozen.keep_unregistered`), so checkpoints never carry it and
    optimizers never see it; it follows the captioner's device.

    Raises:
        ValueError: the captioner's LM is not a ``PrefixLM`` (:func:`check_reference_lm`).
    """
    check_reference_lm(captioner, type(owner).__name__)
    if not captioner.lm.trains:
        return captioner.lm
    if captioner.lm.lora is not None:
        return WithoutAdapters(captioner.lm)
    reference = getattr(owner, "_reference_lm", None)
    if reference is None:
        reference = PrefixLM(captioner.lm.pretrained, trainable=False, dtype=_dtype_name(captioner.lm))
        keep_unregistered(owner, "_reference_lm", reference)
    return reference.to(captioner.device)


class WithoutAdapters:
    """A LoRA-adapted :class:`PrefixLM` seen with its adapters switched off: the pretrained LM, as the
    KL terms need it, read from the same weights. Offers the parts of ``PrefixLM`` those terms use."""

    def __init__(self, lm: PrefixLM) -> None:
        self.lm = lm
        self.tokenizer = lm.tokenizer
        self.model = lm.model

    @property
    def eos_token_id(self) -> int:
        return self.lm.eos_token_id

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        with self.lm.model.disable_adapter():
            return self.lm.embed(input_ids)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        with self.lm.model.disable_adapter():
            return self.lm(*args, **kwargs)


def _dtype_name(lm: PrefixLM) -> str:
    return str(lm.dtype).removeprefix("torch.")


def start_token_id(lm: PrefixLM) -> int:
    """What an un-prefixed caption starts from: the BOS token, or EOS for LMs without one (GPT-2)."""
    start = lm.tokenizer.bos_token_id
    return lm.eos_token_id if start is None else int(start)
