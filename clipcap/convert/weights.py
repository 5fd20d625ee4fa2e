"""What every conversion uses: the state dict inside a checkpoint file, and checks that weights are there
and fit the model they are loaded into, with messages naming the file and key.

Shapes: D_clip CLIP feature size, H the MLP's hidden width, P prefix length, C the Transformer mapper's
``clip_length``, D the LM's width, V its vocabulary, B batch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from clipcap.checkpoints import EggCheckpoint

StateDict = dict[str, torch.Tensor]


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


def require_weight(
    weights: Mapping[str, torch.Tensor], key: str, source: str, what: str, shown_prefix: str = ""
) -> torch.Tensor:
    """``weights[key]``, or an error naming the file and the key as the file spells it (``shown_prefix``)."""
    if key not in weights:
        raise ValueError(f"{source}: {what} needs key {shown_prefix + key!r}, which is missing")
    return weights[key]


def layer_count(weights: Mapping[str, torch.Tensor], prefix: str, source: str) -> int:
    """How many ``<prefix>N.`` blocks there are; they must be numbered 0..N-1."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(match.group(1)) for key in weights if (match := pattern.match(key))}
    if indices != set(range(len(indices))):
        raise ValueError(
            f"{source}: layers {prefix}N are not numbered 0..{len(indices) - 1}: {sorted(indices)}"
        )
    return len(indices)


def shape_of(tensor: torch.Tensor) -> tuple[int, ...]:
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
        if shape_of(value) != shape_of(target[key]):
            raise ValueError(
                f"{source}: {what} weight {name(key)} has shape {shape_of(value)} in the checkpoint but "
                f"{shape_of(target[key])} here"
            )
    missing = [key for key in target if key not in weights and key not in may_be_missing]
    if missing:
        raise ValueError(f"{source}: the checkpoint has no weight for {what} key {missing[0]!r}")
