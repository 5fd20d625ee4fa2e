"""The decoding KV cache written in place (``clipcap.kv_cache``): the same keys and values as transformers'
``DynamicCache`` under every operation decoding performs, and the same captions."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, Gemma2Config, GPT2Config, LlamaConfig
from transformers.cache_utils import DynamicLayer

from clipcap.captioner import ClipCaptioner
from clipcap.generation import KV_CACHES, DecodingConfig
from clipcap.kv_cache import PreallocatedLayer, decoding_cache
from clipcap.lm import PrefixLM
from clipcap.mapper import MLPMapper

CLIP_DIM = 16


def states(rows: int, positions: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (rows, 2 heads, positions, 3) keys and (rows, 2 heads, positions, 5) values."""
    return torch.randn(rows, 2, positions, 3, generator=generator), torch.randn(
        rows, 2, positions, 5, generator=generator
    )


def within_groups(rows: int, group: int, generator: torch.Generator) -> torch.Tensor:
    """A beam-search reorder: each row takes a random row of its own group."""
    offsets = torch.arange(rows) // group * group
    return offsets + torch.randint(0, group, (rows,), generator=generator)


def assert_same(layer: PreallocatedLayer, reference: DynamicLayer) -> None:
    assert layer.get_seq_length() == reference.get_seq_length()
    assert layer.get_mask_sizes(1) == reference.get_mask_sizes(1)
    torch.testing.assert_close(layer.keys, reference.keys, rtol=0, atol=0)
    torch.testing.assert_close(layer.values, reference.values, rtol=0, atol=0)


def test_preallocated_layer_holds_what_a_dynamic_layer_holds_through_a_beam_search() -> None:
    """Prefix, repeat per beam, steps with reorders among each image's beams, a crop, growth past the
    capacity, a selection of rows: after each, the same keys, values, length and mask sizes."""
    generator = torch.Generator().manual_seed(0)
    images, beams = 3, 4
    layer, reference = PreallocatedLayer(capacity=8), DynamicLayer()

    def update(keys: torch.Tensor, values: torch.Tensor) -> None:
        returned = layer.update(keys, values)
        expected = reference.update(keys, values)
        for got, want in zip(returned, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert_same(layer, reference)

    update(*states(images, 5, generator))
    for cache in (layer, reference):
        cache.batch_repeat_interleave(beams)
    assert_same(layer, reference)
    assert layer.shared == 5
    rows = images * beams
    for step in range(6):  # 5 + 6 positions: past the capacity of 8, so the buffer grows once
        update(*states(rows, 1, generator))
        order = within_groups(rows, beams, generator)
        for cache in (layer, reference):
            cache.reorder_cache(order)
        assert_same(layer, reference)
        if step == 2:
            for cache in (layer, reference):
                cache.crop(-2)
            assert_same(layer, reference)
    assert layer.capacity >= layer.get_seq_length() > 8
    kept = torch.tensor([0, 5, 6, 11])
    for cache in (layer, reference):
        cache.batch_select_indices(kept)
    assert_same(layer, reference)
    assert layer.shared == 0  # the rows kept are not whole groups: nothing is shared any more
    update(*states(len(kept), 2, generator))
    for cache in (layer, reference):
        cache.reorder_cache(torch.tensor([3, 3, 0, 1]))  # any order once nothing is shared
    assert_same(layer, reference)


def test_preallocated_layer_writes_in_place_and_refuses_a_positive_crop() -> None:
    generator = torch.Generator().manual_seed(1)
    layer = PreallocatedLayer(capacity=6)
    layer.update(*states(2, 3, generator))
    buffer = layer.keys.untyped_storage().data_ptr()
    layer.update(*states(2, 1, generator))
    assert layer.keys.untyped_storage().data_ptr() == buffer  # no new tensor: written into the buffer
    with pytest.raises(ValueError, match="negative"):
        layer.crop(2)
    with pytest.raises(ValueError, match="capacity"):
        PreallocatedLayer(capacity=0)


def test_decoding_cache_replaces_only_full_attention_layers() -> None:
    for config in (GPT2Config(n_layer=2), LlamaConfig(num_hidden_layers=3)):
        cache = decoding_cache(config, capacity=50)
        assert [type(layer) for layer in cache.layers] == [PreallocatedLayer] * len(cache.layers)
        assert isinstance(cache, DynamicCache)
    # Gemma 2 alternates sliding-window and full layers: transformers' own layers, all of them.
    mixed = decoding_cache(Gemma2Config(num_hidden_layers=2), capacity=50)
    assert not any(isinstance(layer, PreallocatedLayer) for layer in mixed.layers)


DECODINGS = [
    DecodingConfig(max_new_tokens=9),
    DecodingConfig(num_beams=3, max_new_tokens=9),
    DecodingConfig(num_beams=3, num_return_sequences=2, max_new_tokens=9, length_penalty=0.5),
    DecodingConfig(num_beams=3, max_new_tokens=9, beam_ranking="clipcap"),
    DecodingConfig(do_sample=True, num_return_sequences=3, max_new_tokens=9, top_k=20),
    DecodingConfig(num_beams=4, max_new_tokens=12, ignore_stops=True),
]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_every_kv_cache_decodes_the_same_captions(arch: str, gpt2_folder: Path, llama_folder: Path) -> None:
    """Greedy, beam search with both rankings, several beams returned, sampling and fixed-length decoding
    give the same ids with clipcap's in-place cache (the default), transformers' ``DynamicCache`` and its
    ``StaticCache`` (not with ClipCap's ranking, which refuses it), on GPT-2 and LLaMA (grouped keys), in
    eval mode and, but for the static cache (whose attention dropout draws over every allocated position),
    with dropout on (``keep_mode`` in training)."""
    torch.manual_seed(0)
    folder = gpt2_folder if arch == "gpt2" else llama_folder
    captioner = ClipCaptioner(
        PrefixLM(str(folder), trainable=True),
        functools.partial(MLPMapper, prefix_length=4),
        clip_dim=CLIP_DIM,
    )
    features = torch.randn(3, CLIP_DIM)
    for decoding in DECODINGS:
        for training in (False, True):
            captioner.train(training)
            decoded = {}
            for cache in KV_CACHES:
                if cache == "static" and decoding.beam_ranking == "clipcap":
                    with pytest.raises(ValueError, match="kv_cache=static"):
                        captioner.generate_ids(features, replace(decoding, kv_cache=cache))
                    continue
                if cache == "static" and training:
                    continue  # its attention dropout draws masks over every allocated position
                torch.manual_seed(1)
                decoded[cache] = captioner.generate_ids(
                    features, replace(decoding, kv_cache=cache), keep_mode=True
                )
            for cache, ids in decoded.items():
                assert ids == decoded["preallocated"], (cache, decoding, training)
            assert any(len(ids) > 1 for ids in decoded["preallocated"])
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        DecodingConfig(kv_cache="paged")


def test_the_default_cache_is_written_in_place_and_dynamic_is_transformers(gpt2_folder: Path) -> None:
    """What ``generate`` starts from: the in-place cache by default, transformers' ``DynamicCache`` with
    ``kv_cache: dynamic``, nothing with ``static`` (generate builds its own)."""
    captioner = ClipCaptioner(
        PrefixLM(str(gpt2_folder)), functools.partial(MLPMapper, prefix_length=4), clip_dim=CLIP_DIM
    )
    prefix = captioner.prefix(torch.randn(2, CLIP_DIM)).detach()
    mask = torch.ones(prefix.shape[:2], dtype=torch.long)
    with torch.no_grad():
        for beams in (1, 3):
            default = captioner._starting_cache(prefix, mask, DecodingConfig(num_beams=beams))
            assert all(isinstance(layer, PreallocatedLayer) for layer in default.layers)
            dynamic = captioner._starting_cache(
                prefix, mask, DecodingConfig(num_beams=beams, kv_cache="dynamic")
            )
            assert (
                (dynamic is None)
                if beams == 1
                else all(type(layer) is DynamicLayer for layer in dynamic.layers)
            )
            assert (
                captioner._starting_cache(prefix, mask, DecodingConfig(num_beams=beams, kv_cache="static"))
                is None
            )
    with pytest.raises(ValueError, match="kv_cache=static"):
        captioner.rollout_with_logits(torch.randn(2, CLIP_DIM), DecodingConfig(kv_cache="static"))


def test_decoding_with_gradients_keeps_transformers_cache(gpt2_folder: Path) -> None:
    """A rollout that keeps its graph must not write keys in place (autograd saved them): with gradients
    the starting cache is transformers' ``DynamicCache`` (or none), without them the in-place one."""
    torch.manual_seed(0)
    captioner = ClipCaptioner(
        PrefixLM(str(gpt2_folder), trainable=True),
        functools.partial(MLPMapper, prefix_length=4),
        clip_dim=CLIP_DIM,
    )
    prefix = captioner.prefix(torch.randn(2, CLIP_DIM))
    mask = torch.ones(prefix.shape[:2], dtype=torch.long)
    beams = DecodingConfig(num_beams=2, max_new_tokens=5)
    with torch.no_grad():
        assert all(
            isinstance(layer, PreallocatedLayer)
            for layer in captioner._starting_cache(prefix, mask, beams).layers
        )
        assert captioner._starting_cache(prefix, mask, DecodingConfig()) is not None
    cache = captioner._starting_cache(prefix, mask, beams)
    assert type(cache) is DynamicCache and not any(
        isinstance(layer, PreallocatedLayer) for layer in cache.layers
    )
    assert captioner._starting_cache(prefix, mask, DecodingConfig()) is None
    ids, _, logits = captioner.rollout_with_logits(torch.randn(2, CLIP_DIM), DecodingConfig(max_new_tokens=5))
    logits.float().logsumexp(-1).sum().backward()  # no in-place write broke the graph
    assert captioner.mapper.net[0].weight.grad is not None
