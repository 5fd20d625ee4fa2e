"""The differentiable Gumbel-softmax rollout of a captioner (Jin et al. 2023).

Shapes: B images, P prefix length, L caption steps (at most ``max_new_tokens``), D LM width, V vocabulary,
H attention heads, K key/value head width.

At each step the LM's next-token logits are perturbed with Gumbel noise g and turned into a sample vector
y_t over the vocabulary: hard (straight-through: the forward value is the one-hot of argmax(logits + g),
the gradient that of softmax((logits + g) / τ)) or soft (the softmax itself). The next input embedding is
``y_t @ E`` with E the LM's input embedding matrix (V, D), so a hard sample feeds back exactly its token's
embedding while gradients reach the logits through y_t. Captions end at the first stop token of the hard
sample; positions after it are masked.

The rollout keeps the LM's keys and values of earlier positions (a KV cache, one new position per step
after the prefix). They are held as explicit per-step tensors, and each step builds a ``DynamicCache``
from them: a ``DynamicCache`` is mutated in place, and an activation-checkpointed step is run twice (once
in forward, once in backward), so the step must read the past and return its new keys and values, never
append to a shared cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, PreTrainedModel

from clipcap.captioner import ClipCaptioner
from clipcap.compat import cache_kwargs, returned_cache
from clipcap.generation import stop_token_ids


@dataclass
class GumbelRollout:
    """Options of the Gumbel-softmax rollout.

    Args:
        max_new_tokens: caption steps (L), the stop token included; the rollout ends earlier once every
            caption has stopped.
        temperature: Gumbel-softmax temperature τ > 0; lower is closer to one-hot (and noisier gradients).
        hard: straight-through samples (one-hot forward, softmax gradient); False feeds back the soft
            sample vectors themselves.
        stop_at_period: also stop at the first token containing "." (EOS always stops).
        use_cache: keep the keys and values of earlier positions; False re-runs the prefix and every
            sampled embedding at each step (the slow reference, O(L²) LM work).
        checkpoint_steps: recompute each step's LM call in backward instead of keeping its activations
            (activation checkpointing per step): less memory for one more LM forward.
    """

    max_new_tokens: int = 20
    temperature: float = 1.0
    hard: bool = True
    stop_at_period: bool = False
    use_cache: bool = True
    checkpoint_steps: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"GumbelRollout: max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        _check_temperature(self.temperature)


@dataclass
class SoftCaption:
    """A batch of rolled-out captions, differentiable through ``weights`` and ``logits``.

    Position t holds a caption token when ``mask[:, t]`` is 1, the row's stop token at ``t = lengths``
    (when the row stopped), and nothing after it.

    Attributes:
        weights: (B, L, V) float32 sample vectors y_t (one-hot in the forward pass for hard samples),
            through the stop token, zero after it.
        token_ids: (B, L) the hard ids argmax(logits + g), the stop id included, the LM's pad id after it.
        lengths: (B,) caption tokens before the stop (the stop excluded); L for a row that never stops.
        mask: (B, L) 1 on the caption tokens before the stop, 0 on the stop and after it.
        logits: (B, L, V) float32 logits the LM gave at each step (before noise and temperature), for KL
            or entropy terms; computed for every row, so mask them.
    """

    weights: Tensor
    token_ids: Tensor
    lengths: Tensor
    mask: Tensor
    logits: Tensor


def gumbel_softmax_sample(logits: Tensor, noise: Tensor, temperature: float, hard: bool) -> Tensor:
    """A Gumbel-softmax sample vector from given noise.

    Args:
        logits: (B, V) float logits.
        noise: (B, V) Gumbel(0, 1) noise.
        temperature: τ > 0.
        hard: straight-through: the forward value is exactly one-hot at argmax(logits + noise) and the
            gradient is that of the soft sample.

    Returns:
        (B, V) the sample vectors y, in the dtype of ``logits``.
    """
    perturbed = logits + noise
    soft = torch.softmax(perturbed / temperature, dim=-1)
    if not hard:
        return soft
    one_hot = F.one_hot(perturbed.argmax(dim=-1), logits.shape[-1]).to(soft.dtype)
    # Straight-through: soft - soft.detach() is exactly 0 in forward and carries the softmax's gradient.
    return one_hot + (soft - soft.detach())


def gumbel_rollout(
    captioner: ClipCaptioner,
    clip_features: Tensor,
    options: GumbelRollout,
    temperature: float | None = None,
    generator: torch.Generator | None = None,
) -> SoftCaption:
    """Rolls out captions with Gumbel-softmax samples fed back as embedding mixtures.

    Runs in whatever mode (train or eval) and grad mode the caller set: dropout in a training LM is
    applied (and replayed exactly when steps are checkpointed). Rows that have stopped keep being rolled
    out with the others (their positions are masked) until every row has stopped.

    Memory: besides the LM's activations (kept per step, or recomputed with ``checkpoint_steps``), each
    step keeps two (B, V) float32 tensors for backward (the softmax and the sample vector) and the outputs
    hold two (B, L, V) ones; with checkpointing these dominate for a GPT-2-sized vocabulary.

    Args:
        captioner: the captioner; its mapper gives the prefix, its LM the logits and input embeddings.
        clip_features: (B, D_clip) or (B, G, D_clip) CLIP features.
        options: rollout options.
        temperature: overrides ``options.temperature`` (so an objective can anneal it); must be > 0.
        generator: draws the Gumbel noise (on the generator's device) for reproducible rollouts; the
            global RNG when None.

    Returns:
        The rolled-out captions, L = the steps run (``max_new_tokens``, or fewer when every row stopped).

    Raises:
        ValueError: a temperature ≤ 0; or ``use_cache`` with an LM whose Hugging Face gradient
            checkpointing is on in training mode (it drops the cache; use ``checkpoint_steps`` instead).
    """
    tau = options.temperature if temperature is None else _check_temperature(temperature)
    lm = captioner.lm
    model = lm.model
    if options.use_cache and lm.checkpointing and model.training:
        raise ValueError(
            "gumbel_rollout: the LM has Hugging Face gradient checkpointing on, which drops the KV cache in "
            "training mode; build PrefixLM(gradient_checkpointing=False) and set "
            "GumbelRollout(checkpoint_steps=True) instead, or use_cache=False"
        )
    prefix = captioner.prefix(clip_features)
    batch, device = prefix.shape[0], prefix.device
    embedding_matrix = model.get_input_embeddings().weight  # (V, D)
    # The last position's logits only, where the model can skip the LM head on the others.
    logits_kwargs = {"logits_to_keep": 1} if lm.takes_logits_to_keep else {}
    stops = torch.tensor(stop_token_ids(lm, options.stop_at_period, captioner.caption_end), device=device)

    def run(function: Callable[..., tuple[Tensor, ...]], *inputs: Tensor) -> tuple[Tensor, ...]:
        if options.checkpoint_steps:
            return checkpoint(function, *inputs, use_reentrant=False)
        return function(*inputs)

    past: list[Tensor] = []  # cached keys and values, per chunk (the prefix, then one per step) per layer
    per_chunk = 0  # tensors per chunk: two per layer
    sequence = prefix  # without a cache: the prefix and every embedding fed back so far, (B, P + t, D)
    step_input = prefix  # with a cache: the positions not yet run, (B, 1 or P, D)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    weights, token_ids, masks, all_logits = [], [], [], []
    for step in range(options.max_new_tokens):
        if options.use_cache:
            logits, *new_past = run(_CachedStep(model, per_chunk, logits_kwargs), step_input, *past)
            past.extend(new_past)
            per_chunk = len(new_past)
        else:
            (logits,) = run(_FullStep(model, logits_kwargs), sequence)
        if logits.shape[-1] != embedding_matrix.shape[0]:
            raise ValueError(
                f"gumbel_rollout: the LM gives {logits.shape[-1]} logits but has {embedding_matrix.shape[0]} "
                "input embeddings; the sample vectors cannot be fed back"
            )
        noise = _gumbel_noise(logits.shape, device, generator)
        sample = gumbel_softmax_sample(logits, noise, tau, options.hard)
        ids = (logits + noise).argmax(dim=-1)
        alive = ~finished  # rows still captioning: this position is a caption token or the stop
        is_stop = torch.isin(ids, stops)
        caption = alive & ~is_stop
        weights.append(sample * alive[:, None].to(sample.dtype))
        token_ids.append(torch.where(alive, ids, lm.pad_token_id))
        masks.append(caption)
        all_logits.append(logits)
        lengths += caption.long()
        finished = finished | is_stop
        if step == options.max_new_tokens - 1 or bool(finished.all()):
            break
        # In the LM's dtype; for a one-hot sample this is exactly the token's embedding row.
        embedding = (sample.to(embedding_matrix.dtype) @ embedding_matrix)[:, None]  # (B, 1, D)
        step_input = embedding
        if not options.use_cache:
            sequence = torch.cat([sequence, embedding], dim=1)
    return SoftCaption(
        weights=torch.stack(weights, dim=1),
        token_ids=torch.stack(token_ids, dim=1),
        lengths=lengths,
        mask=torch.stack(masks, dim=1).long(),
        logits=torch.stack(all_logits, dim=1),
    )


class _CachedStep:
    """One LM call on new positions given the keys and values of earlier ones.

    Called as ``step(embeds, *past)``: ``embeds`` (B, T, D) the new positions; ``past`` the cached keys and
    values as flat tensors, chunk by chunk (the prefix, then one chunk per step), layer by layer within a
    chunk, key before value, each (B, H, T_chunk, K), ``per_chunk`` tensors a chunk. Returns
    ``(logits, *new)``: (B, V) float32 logits of the last position and the new positions' keys and values
    (B, H, T, K) in the same layout, copied out so that they do not keep the concatenated cache alive.

    The ``DynamicCache`` is built inside the call from the explicit tensors, so a checkpointed call that is
    recomputed in backward sees the same past and appends nothing twice.
    """

    def __init__(self, model: PreTrainedModel, per_chunk: int, logits_kwargs: dict[str, int]) -> None:
        self.model = model
        self.per_chunk = per_chunk
        self.logits_kwargs = logits_kwargs

    def __call__(self, embeds: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        cache = DynamicCache(ddp_cache_data=_concatenate_chunks(past, self.per_chunk) if past else None)
        past_length = cache.get_seq_length()
        batch, new_length = embeds.shape[:2]
        attention_mask = torch.ones(batch, past_length + new_length, dtype=torch.long, device=embeds.device)
        output = self.model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            use_cache=True,
            **cache_kwargs(cache),
            **self.logits_kwargs,
        )
        cache = returned_cache(output)
        if cache is None or cache.get_seq_length() != past_length + new_length:
            raise RuntimeError(
                f"gumbel_rollout: {type(self.model).__name__} did not extend the KV cache it was given; "
                "set GumbelRollout(use_cache=False)"
            )
        new: list[Tensor] = []
        for layer in cache.layers:
            new += [layer.keys[..., -new_length:, :].clone(), layer.values[..., -new_length:, :].clone()]
        return (output.logits[:, -1].float(), *new)


def _concatenate_chunks(past: Sequence[Tensor], per_chunk: int) -> list[tuple[Tensor, Tensor]]:
    """Flat chunk-major keys and values, ``per_chunk`` tensors a chunk → per layer (keys, values), each
    (B, H, T_past, K)."""
    chunks = [past[start : start + per_chunk] for start in range(0, len(past), per_chunk)]
    return [
        (
            torch.cat([chunk[2 * layer] for chunk in chunks], dim=-2),
            torch.cat([chunk[2 * layer + 1] for chunk in chunks], dim=-2),
        )
        for layer in range(per_chunk // 2)
    ]


class _FullStep:
    """One LM call on the whole sequence (no cache): (B, T, D) embeddings → ``(logits,)``, (B, V) float32."""

    def __init__(self, model: PreTrainedModel, logits_kwargs: dict[str, int]) -> None:
        self.model = model
        self.logits_kwargs = logits_kwargs

    def __call__(self, sequence: Tensor) -> tuple[Tensor]:
        attention_mask = torch.ones(sequence.shape[:2], dtype=torch.long, device=sequence.device)
        output = self.model(
            inputs_embeds=sequence, attention_mask=attention_mask, use_cache=False, **self.logits_kwargs
        )
        return (output.logits[:, -1].float(),)


def _gumbel_noise(shape: torch.Size, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """(B, V) float32 Gumbel(0, 1) noise -log(-log U), U ~ Uniform[0, 1), drawn on the generator's device.

    U is clamped away from 0 (drawn with probability 2⁻²⁴ per entry), which would give -inf noise. Uniform
    draws and two logs are several times faster on CPU than ``exponential_``.
    """
    source = generator.device if generator is not None else device
    uniform = torch.rand(shape, dtype=torch.float32, device=source, generator=generator)
    return uniform.clamp_min_(torch.finfo(torch.float32).tiny).log_().neg_().log_().neg_().to(device)


def _check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise ValueError(f"GumbelRollout: temperature must be > 0, got {temperature}")
    return temperature
