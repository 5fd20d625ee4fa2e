"""Frozen models: the base of the frozen image encoders, and how a module holds a frozen model (or data) it
uses but does not own, outside its module tree."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import nn

E = TypeVar("E", bound="FrozenEncoder")


def keep_unregistered(owner: nn.Module, name: str, value: object) -> None:
    """Sets ``owner.<name> = value`` without registering ``value`` as a submodule, parameter or buffer.

    ``nn.Module`` registers any module or parameter assigned to it; a value set here is a plain attribute
    instead, so it is in no ``state_dict`` (no checkpoint carries a copy), no ``parameters()`` (no
    optimizer sees it), and ``owner.to()``, DDP and FSDP leave it alone. It is for the frozen models an
    objective or metric uses (a receiver CLIP, a reference LM) and for data (a distractor bank). Read it
    back as ``owner.<name>``; set it again with this function, never with plain assignment, which would
    register a module.
    """
    object.__setattr__(owner, name, value)


class FrozenEncoder(nn.Module):
    """The base of the frozen image encoders (``ClipEncoder``, ``BlipImageEncoder``): named by the
    checkpoint they were created from, and always in eval mode (no dropout), even when a parent module is
    put in training mode. A subclass loads its model, then :meth:`_hold` s it."""

    _name: str

    @classmethod
    def _bare(cls: type[E]) -> E:
        """An instance whose ``__init__`` (which loads a checkpoint) did not run, for ``from_model``."""
        encoder = cls.__new__(cls)
        nn.Module.__init__(encoder)
        return encoder

    def _hold(self, model: nn.Module, preprocess: Any, name: str, path: str) -> None:
        """Keeps ``model`` frozen (no gradients) with its preprocessing, its name and where it came from."""
        self.model = model
        self.model.requires_grad_(False)
        self.preprocess = preprocess
        self._name = name
        self._path = path
        self.eval()

    def _weights_sha1(self, keys: Sequence[str], skip_missing: bool = False) -> str:
        """16 hex digits of a SHA-1 over the named parameters (name, shape, float32 bytes): what tells two
        checkpoints of one architecture apart in a feature cache's fingerprint.

        Raises:
            KeyError: a key the model lacks, unless ``skip_missing``.
        """
        parameters = dict(self.model.named_parameters())
        digest = hashlib.sha1()
        for key in keys:
            if skip_missing and key not in parameters:
                continue
            tensor = parameters[key].detach().to(device="cpu", dtype=torch.float32).contiguous()
            digest.update(key.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.numpy().tobytes())
        return digest.hexdigest()[:16]

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Ignores ``mode``: the encoder stays in eval mode because it is frozen."""
        return super().train(False)

    @property
    def name(self) -> str:
        """The name the encoder was created from (e.g. ``openai/clip-vit-base-patch32``)."""
        return self._name
