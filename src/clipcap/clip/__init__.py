"""CLIP: offline tokenizer, image preprocessing and a frozen encoder over ``transformers.CLIPModel``."""

from clipcap.clip.encoder import ClipEncoder
from clipcap.clip.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipImagePreprocessor
from clipcap.clip.tokenizer import (
    CONTEXT_LENGTH,
    ClipTokenizer,
    clean_caption_text,
    load_clip_tokenizer,
    openai_bpe_path,
)

__all__ = [
    "CONTEXT_LENGTH",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ClipEncoder",
    "ClipImagePreprocessor",
    "ClipTokenizer",
    "clean_caption_text",
    "load_clip_tokenizer",
    "openai_bpe_path",
]
