"""A KV cache for decoding that never grows by concatenation: buffers allocated once, written in place.

Shapes: N rows (images × beams or samples), H key/value heads, C the buffer's capacity in positions (the
prefix plus ``max_new_tokens``), T the positions written so far, d the head size.

transformers' ``DynamicCache`` concatenates each step's keys and values onto the cache (a copy of the whole
cache per step and layer), and beam search then reorders it with ``index_select`` (a second copy): in a
profile of beam 5 on the ``small`` GPT-2 shape (32 images, 40 tokens) the two were 17 % and 14 % of the
call. This cache removes the first and the prefix's share of the second: 1.09× at ``small``, 1.12× at
``gpt2-small`` (docs/benchmarks.md, "KV cache for decoding"). Transformers' ``StaticCache``, built for
``torch.compile``, preallocates too, but attends over all C positions at every step and reorders all C of
them (0.89–1.00× on the same CPU). :class:`PreallocatedLayer` keeps the dynamic layer's
semantics (attention over the T positions written, a mask of T positions) in a buffer of C:

- a step writes its positions into the buffer (no copy of what is there);
- beam search's reorder copies the rows into a second buffer and swaps the two, and copies only the
  positions written after the prefix was repeated: an image's beams share its prefix, so those positions
  are equal across the rows any reorder chooses between (beam search only reorders among an image's own
  beams);
- a step beyond C (a caller who asked for more positions than it said) grows the buffer, doubling it.

Only full-attention layers are replaced: a model whose cache has sliding-window or other layer kinds keeps
transformers' own layers (:func:`decoding_cache`).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """One layer's keys and values in (N, H, C, d) buffers; ``keys`` and ``values`` are (N, H, T, d) views.

    Args:
        capacity: positions to allocate for (C); more are allocated, by doubling, if a step needs them.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        if capacity < 1:
            raise ValueError(f"PreallocatedLayer: capacity must be ≥ 1, got {capacity}")
        self.capacity = capacity
        self.length = 0
        # Leading positions equal within each group of rows that batch_repeat_interleave made: a reorder
        # among a group's rows leaves them as they are.
        self.shared = 0
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._spares: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._allocate(key_states.shape[0], key_states, value_states, self.capacity)
        self.is_initialized = True

    def _allocate(self, rows: int, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        """Fresh buffers of ``rows`` rows and ``capacity`` positions shaped like ``keys`` and ``values``."""
        self.capacity = capacity
        self._buffers = (
            keys.new_empty(rows, keys.shape[1], capacity, keys.shape[3]),
            values.new_empty(rows, values.shape[1], capacity, values.shape[3]),
        )
        self._spares = None

    def _view(self) -> None:
        key_buffer, value_buffer = self._buffers
        self.keys = key_buffer[:, :, : self.length]
        self.values = value_buffer[:, :, : self.length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            old_keys, old_values = self.keys, self.values
            self._allocate(old_keys.shape[0], old_keys, old_values, max(end, 2 * self.capacity))
            self._buffers[0][:, :, : self.length].copy_(old_keys)
            self._buffers[1][:, :, : self.length].copy_(old_values)
        key_buffer, value_buffer = self._buffers
        key_buffer[:, :, self.length : end].copy_(key_states)
        value_buffer[:, :, self.length : end].copy_(value_states)
        self.length = end
        self._view()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row ``i`` becomes row ``beam_idx[i]``; ``beam_idx`` must keep each row within the group of rows
        ``batch_repeat_interleave`` made from one (beam search's indices do), as the shared positions are
        not copied."""
        if self.length == 0:
            return
        start = self.shared
        if self._spares is None:
            key_buffer, value_buffer = self._buffers
            self._spares = (torch.empty_like(key_buffer), torch.empty_like(value_buffer))
            self._spares[0][:, :, :start].copy_(key_buffer[:, :, :start])
            self._spares[1][:, :, :start].copy_(value_buffer[:, :, :start])
        beam_idx = beam_idx.to(self.device)
        for buffer, spare in zip(self._buffers, self._spares, strict=True):
            torch.index_select(
                buffer[:, :, start : self.length], 0, beam_idx, out=spare[:, :, start : self.length]
            )
        self._buffers, self._spares = self._spares, self._buffers
        self._view()

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row repeated ``repeats`` times in place; the positions written so far become shared."""
        if self.length == 0:
            return
        keys, values = self.keys, self.values
        self._allocate(keys.shape[0] * repeats, keys, values, self.capacity)
        self._buffers[0][:, :, : self.length].copy_(keys.repeat_interleave(repeats, dim=0))
        self._buffers[1][:, :, : self.length].copy_(values.repeat_interleave(repeats, dim=0))
        self.shared = self.length
        self._view()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length == 0:
            return
        keys, values = self.keys[indices], self.values[indices]
        self._allocate(keys.shape[0], keys, values, self.capacity)
        self._buffers[0][:, :, : self.length].copy_(keys)
        self._buffers[1][:, :, : self.length].copy_(values)
        self.shared = 0  # the rows kept need not be whole groups
        self._view()

    def crop(self, tokens_to_remove: int) -> None:
        """Drops the last ``-tokens_to_remove`` positions (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of positions to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.length = max(self.length + tokens_to_remove, 0)
        self.shared = min(self.shared, self.length)
        self._view()

    def reset(self) -> None:
        self.length = self.shared = 0
        self._buffers = self._spares = None
        super().reset()


def decoding_cache(config, capacity: int) -> DynamicCache:
    """An empty ``DynamicCache`` for ``config``'s model whose full-attention layers are
    :class:`PreallocatedLayer` of ``capacity`` positions; if the model has layers of any other kind
    (sliding window, linear attention), transformers' own layers, all of them."""
    cache = DynamicCache(config=config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [PreallocatedLayer(capacity) for _ in cache.layers]
    return cache
