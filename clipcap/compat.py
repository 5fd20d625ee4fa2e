"""What differs between the transformers releases clipcap supports (5.17 up to the newest 5.x).

transformers 5.24 renamed the KV-cache argument ``past_key_values`` to ``cache`` everywhere at once: in
every model's ``forward``, in ``generate``, in ``create_causal_mask`` and in the output classes. The old
name still works there but warns, and forward passes and masks lose it in 5.40; before 5.24 the new name
is refused. Every clipcap call that passes or reads a KV cache goes through this module, so the project
speaks each release's own API and never triggers the deprecation.

The same release family deprecated ``gradient_checkpointing_enable`` for ``activation_checkpointing_enable``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask

# Detected from the API itself, not from a version number: the rename reached every function in one
# release, and create_causal_mask is a plain function whose signature is not hidden by a decorator.
CACHE_ARGUMENT: str = (
    "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
)


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` under the installed transformers' name for the KV-cache argument of a model's
    ``forward``, ``generate`` and ``create_causal_mask``."""
    return {CACHE_ARGUMENT: cache}


def returned_cache(output: Any) -> Any:
    """The KV cache a model's forward pass returned (``output.cache``, ``output.past_key_values`` before
    5.24), or None; reading the old name on a new release would warn."""
    return getattr(output, CACHE_ARGUMENT, None)


def causal_mask(
    config: PreTrainedConfig, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor | None:
    """``create_causal_mask`` with no KV cache: the causal + padding mask a text model builds for
    ``inputs_embeds`` (B, T, D) and the (B, T) ``attention_mask``."""
    return create_causal_mask(
        config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, **cache_kwargs(None)
    )


def generate_with_gradients(model: PreTrainedModel) -> Callable[..., Any]:
    """``model.generate`` without its decorators, so the graph is kept (``generate`` runs under
    ``torch.no_grad()``).

    Every decorator is removed, not only the outer one: from 5.24 ``generate`` is wrapped in argument
    renaming decorators above ``no_grad``, and removing one layer kept ``no_grad`` and skipped the renaming.
    Arguments must therefore use the installed release's names (:func:`cache_kwargs`).
    """
    return functools.partial(inspect.unwrap(type(model).generate), model)


def enable_activation_checkpointing(model: PreTrainedModel, **checkpoint_kwargs: Any) -> None:
    """Turns on per-layer activation checkpointing with ``torch.utils.checkpoint`` options
    ``checkpoint_kwargs``, under the name the installed release uses."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
