"""Tiny language models built from config objects, saved in Hugging Face format (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPConfig,
    CLIPModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

CORPUS = [
    "a red circle on the left.",
    "a small blue square!",
    "two shapes on a grey background.",
    "a large green triangle at the top, next to a yellow star.",
    "look, a purple circle!",
    "an orange square in the centre.",
] * 4


def _byte_level_tokenizer(special: list[str], vocab_size: int = 300) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def save_tiny_gpt2(folder: Path, seed: int = 0, n_layer: int = 2, n_embd: int = 32) -> Path:
    """A GPT-2-shaped LM with a byte-level BPE tokenizer; like GPT-2 it has no pad token."""
    torch.manual_seed(seed)
    raw = _byte_level_tokenizer(["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=4,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_llama(folder: Path, seed: int = 0, hidden: int = 32) -> Path:
    """A LLaMA-shaped LM (RMSNorm, rotary, SwiGLU, grouped-query attention) with BOS/EOS like LLaMA's: its
    tokenizer starts every text with ``<s>``, as LLaMA's does."""
    torch.manual_seed(seed)
    raw = _byte_level_tokenizer(["<unk>", "<s>", "</s>"])
    bos = raw.token_to_id("<s>")
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_clip_model(seed: int) -> CLIPModel:
    """A CLIP with openai's text vocabulary and 32-wide towers on 32 px images (16-d embeddings)."""
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=16,
    )
    return CLIPModel(config).eval()


def tiny_captioner(clip_dim: int, trainable: bool = True, prefix_length: int = 4):
    """The tiny synthetic world's LM (``synthetic:lm``, see tests/conftest.py ``tiny_world``) behind an MLP
    mapper."""
    import functools

    from clipcap.captioner import ClipCaptioner
    from clipcap.lm import PrefixLM
    from clipcap.mapper import MLPMapper

    return ClipCaptioner(
        PrefixLM("synthetic:lm", trainable=trainable),
        functools.partial(MLPMapper, prefix_length=prefix_length),
        clip_dim=clip_dim,
    )
