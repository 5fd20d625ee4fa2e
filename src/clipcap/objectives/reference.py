"""The frozen, un-prefixed language model that KL terms compare the captioner's LM against."""

from __future__ import annotations

from torch import nn

from clipcap.captioner import ClipCaptioner
from clipcap.lm import PrefixLM


def reference_lm(owner: nn.Module, captioner: ClipCaptioner) -> PrefixLM:
    """The pretrained LM, frozen: the captioner's own LM when it is frozen (its weights never move), else a
    second copy loaded from the same pretrained source once and kept on ``owner``.

    The copy is stored in ``owner.__dict__``, outside the module tree, so checkpoints never carry it and
    optimizers never see it; it follows the captioner's device.
    """
    if not captioner.lm.trainable:
        return captioner.lm
    reference = owner.__dict__.get("_reference_lm")
    if reference is None:
        reference = PrefixLM(captioner.lm.pretrained, trainable=False, dtype=_dtype_name(captioner.lm))
        owner.__dict__["_reference_lm"] = reference
    return reference.to(captioner.device)


def _dtype_name(lm: PrefixLM) -> str:
    return str(lm.dtype).removeprefix("torch.")


def start_token_id(lm: PrefixLM) -> int:
    """What an un-prefixed caption starts from: the BOS token, or EOS for LMs without one (GPT-2)."""
    start = lm.tokenizer.bos_token_id
    return lm.eos_token_id if start is None else int(start)
