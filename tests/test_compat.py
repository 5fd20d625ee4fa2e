"""clipcap speaks the installed transformers' API (``clipcap.compat``).

transformers 5.24 renamed the KV-cache argument ``past_key_values`` to ``cache`` (the old name warns, and
goes in 5.40 for forward passes) and ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``.
Every clipcap path that passes or reads a cache, or turns on checkpointing, runs here on tiny GPT-2 and
LLaMA models; a FutureWarning or DeprecationWarning, or a transformers log record, about either rename
fails the test. The cache given under the detected name must also really be used, on every release.
"""

from __future__ import annotations

import functools
import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoTokenizer, DynamicCache

from clipcap.captioner import ClipCaptioner
from clipcap.clip import ClipEncoder, SoftClipText, VocabularyBridge
from clipcap.compat import CACHE_ARGUMENT, cache_kwargs, causal_mask, returned_cache
from clipcap.generation import DecodingConfig
from clipcap.gumbel import GumbelRollout, gumbel_rollout
from clipcap.lm import PrefixLM
from clipcap.mapper import MLPMapper
from tiny_models import tiny_clip_model

CLIP_DIM = 16
RENAMED = re.compile(r"past_key_values|cache_params|`cache`|checkpointing", re.IGNORECASE)


class _Records(logging.Handler):
    def __init__(self, messages: list[str]) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def renamed_argument_notices() -> Iterator[list[str]]:
    """Collects, inside the block, every FutureWarning/DeprecationWarning and every transformers log record
    that mentions a renamed argument; the list is complete once the block has ended.

    transformers logs some notices only once per process (``warning_once``) and an entry point may have
    lowered its verbosity, so both are reset here.
    """
    found: list[str] = []
    handler = _Records(found)
    logger = logging.getLogger("transformers")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    transformers.utils.logging.warning_once.cache_clear()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
    finally:
        logger.removeHandler(handler)
        transformers.logging.set_verbosity(verbosity)
    found += [
        str(warning.message)
        for warning in caught
        if issubclass(warning.category, (FutureWarning, DeprecationWarning))
    ]
    found[:] = [message for message in found if RENAMED.search(message)]


def make_captioner(folder: Path, **lm_options) -> ClipCaptioner:
    torch.manual_seed(0)
    return ClipCaptioner(
        PrefixLM(str(folder), trainable=True, **lm_options),
        functools.partial(MLPMapper, prefix_length=3),
        clip_dim=CLIP_DIM,
    )


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoding_and_rollouts_raise_no_deprecation(folders: dict[str, Path], arch: str) -> None:
    captioner = make_captioner(folders[arch])
    features = torch.randn(2, CLIP_DIM, generator=torch.Generator().manual_seed(0))
    with renamed_argument_notices() as notices:
        captioner.generate_ids(features, DecodingConfig(max_new_tokens=5))
        # Beam search and several samples per image hand generate a shared prefix cache.
        captioner.generate_ids(features, DecodingConfig(num_beams=3, max_new_tokens=5))
        captioner.train()
        sampled = DecodingConfig(do_sample=True, num_return_sequences=2, max_new_tokens=5)
        _, _, logits = captioner.rollout_with_logits(features, sampled)
        soft = gumbel_rollout(captioner, features, GumbelRollout(max_new_tokens=5, use_cache=True))
    assert notices == []
    # The undecorated generate keeps the graph: the rollout's logits reach the mapper.
    assert logits.requires_grad
    (logits.logsumexp(-1).sum() + soft.weights.sum()).backward()
    assert all(p.grad is not None for p in captioner.mapper.parameters())


def test_activation_checkpointing_raises_no_deprecation(folders: dict[str, Path]) -> None:
    with renamed_argument_notices() as notices:
        captioner = make_captioner(folders["gpt2"], gradient_checkpointing=True)
    assert notices == []
    assert captioner.lm.checkpointing


def test_the_soft_clip_text_mask_raises_no_deprecation(folders: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(folders["gpt2"])
    soft = SoftClipText(
        ClipEncoder.from_model(tiny_clip_model(seed=0), name="tiny"), VocabularyBridge.build(tokenizer)
    )
    token_ids = torch.tensor([tokenizer.encode("a red circle") + [tokenizer.eos_token_id]])
    lengths = torch.tensor([token_ids.shape[1] - 1])
    y = torch.nn.functional.one_hot(token_ids, len(tokenizer)).float()
    with renamed_argument_notices() as notices:
        features = soft.encode(y, token_ids, lengths)
    assert notices == []
    torch.testing.assert_close(
        features, soft.clip.encode_text(soft.captions(token_ids, lengths)), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_cache_passed_under_the_detected_name_is_used_and_returned(
    folders: dict[str, Path], arch: str
) -> None:
    """A forward pass takes ``**kwargs``, so a cache under a name the release does not know would be dropped
    without an error: the cache must come back extended by the new positions."""
    model = make_captioner(folders[arch]).lm.model.eval()
    embeds = torch.randn(1, 4, model.config.hidden_size)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(inputs_embeds=embeds[:, :3], use_cache=True, **cache_kwargs(cache))
        output = model(inputs_embeds=embeds[:, 3:], use_cache=True, **cache_kwargs(cache))
        full = model(inputs_embeds=embeds).logits[:, -1]
    assert returned_cache(output) is cache and cache.get_seq_length() == 4
    torch.testing.assert_close(output.logits[:, -1], full, atol=1e-5, rtol=0)


def test_the_notice_collector_sees_the_old_name_where_it_is_deprecated(folders: dict[str, Path]) -> None:
    """The check above can fail: on a release with the rename, the old name is caught."""
    if CACHE_ARGUMENT != "cache":
        pytest.skip(f"transformers {transformers.__version__} still names the argument past_key_values")
    model = make_captioner(folders["gpt2"]).lm.model.eval()
    with renamed_argument_notices() as notices, torch.no_grad():
        output = model(
            inputs_embeds=torch.randn(1, 2, model.config.hidden_size), past_key_values=DynamicCache()
        )
        output.past_key_values  # noqa: B018 - the deprecated output attribute logs a notice too
    assert any("past_key_values" in notice for notice in notices)


def test_the_causal_mask_hides_later_and_padded_positions() -> None:
    config = tiny_clip_model(seed=0).text_model.config
    config._attn_implementation = "eager"
    mask = causal_mask(config, torch.zeros(1, 3, 4), torch.tensor([[1, 1, 0]]))
    allowed = mask[0, 0] == 0 if mask.dtype != torch.bool else mask[0, 0]
    assert allowed.tolist() == [[True, False, False], [True, True, False], [True, True, False]]
