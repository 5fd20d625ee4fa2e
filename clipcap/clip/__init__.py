"""CLIP: offline tokenizer, image preprocessing and a frozen encoder over ``transformers.CLIPModel``.

``clipcap.clip.bridge`` adds the LM -> CLIP vocabulary bridge, and ``clipcap.clip.soft_text`` the
differentiable CLIP text path of captions given as distributions over an LM's vocabulary.
"""

from clipcap.clip.bridge import (
    BYTE_LEVEL,
    METASPACE,
    PLAIN,
    VocabularyBridge,
    default_bridge_cache_dir,
    detect_token_scheme,
    load_vocabulary_bridge,
)
from clipcap.clip.encoder import ClipEncoder
from clipcap.clip.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipImagePreprocessor
from clipcap.clip.soft_text import ClipAlignment, SoftClipText, align_captions
from clipcap.clip.tokenizer import (
    CONTEXT_LENGTH,
    ClipTokenizer,
    clean_caption_text,
    load_clip_tokenizer,
    openai_bpe_path,
)

__all__ = [
    "BYTE_LEVEL",
    "CONTEXT_LENGTH",
    "METASPACE",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "PLAIN",
    "ClipAlignment",
    "ClipEncoder",
    "ClipImagePreprocessor",
    "ClipTokenizer",
    "SoftClipText",
    "VocabularyBridge",
    "align_captions",
    "clean_caption_text",
    "default_bridge_cache_dir",
    "detect_token_scheme",
    "load_clip_tokenizer",
    "load_vocabulary_bridge",
    "openai_bpe_path",
]
