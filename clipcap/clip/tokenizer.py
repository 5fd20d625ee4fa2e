"""An offline CLIP tokenizer that reproduces openai CLIP's ``SimpleTokenizer`` token for token.

openai's ``clip`` package cannot be imported here (it needs torchvision and ``pkg_resources``), but it
ships the BPE vocabulary every CLIP was trained with (``bpe_simple_vocab_16e6.txt.gz``). We locate that
file without importing the package, build the same 49408-entry vocabulary and merge table as
``SimpleTokenizer.__init__``, and hand them to ``transformers.CLIPTokenizer`` so the fast Rust BPE does the
work. The Hugging Face tokenizer does not run openai's text cleaning (``ftfy`` and HTML unescaping), so
:func:`clean_caption_text` is applied first.

Legend for shapes: B = batch size, L = padded sequence length (longest row, at most the context length).
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import ftfy
import regex
import torch
import transformers

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
CONTEXT_LENGTH = 77
"""Context length of every released CLIP text encoder."""

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
# The file holds more merges than CLIP uses; SimpleTokenizer keeps lines 1 .. 49152-256-2 (line 0 is a
# version header), so that 256 bytes + 256 end-of-word bytes + merges + 2 specials = 49408 entries.
_MERGE_LINES = slice(1, 49152 - 256 - 2 + 1)

_WHITESPACE = regex.compile(r"\s+")


def clean_caption_text(text: str) -> str:
    """Cleans text exactly as openai CLIP's ``SimpleTokenizer.encode`` does before BPE.

    ``ftfy.fix_text`` repairs mojibake and normalises to NFC, HTML entities are unescaped twice (captions
    scraped from the web are often double-escaped), whitespace runs are folded to one space, and the text
    is lower-cased.

    Args:
        text: raw caption.

    Returns:
        The cleaned, lower-case caption.
    """
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    text = _WHITESPACE.sub(" ", text).strip()
    return text.lower()


def openai_bpe_path() -> Path:
    """Returns the path of the BPE vocabulary bundled with the ``openai-clip`` package.

    The package is located with ``importlib.util.find_spec`` and never imported: importing it fails
    without torchvision and ``pkg_resources``.

    Raises:
        FileNotFoundError: ``openai-clip`` is not installed or lacks the vocabulary file.
    """
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the openai-clip package is not installed; it provides the CLIP BPE vocabulary "
            f"({BPE_FILENAME}). Install it with `pip install openai-clip`."
        )
    path = Path(spec.submodule_search_locations[0]) / BPE_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"the openai-clip package has no BPE vocabulary at {path}")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table, in openai's order.

    The order matters: it fixes the ids of the first 256 vocabulary entries.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in byte_values:
            byte_values.append(byte)
            code_points.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, (chr(c) for c in code_points), strict=True))


def build_openai_vocab(bpe_path: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Builds openai CLIP's vocabulary and merge list from the bundled BPE file.

    Args:
        bpe_path: path of ``bpe_simple_vocab_16e6.txt.gz``.

    Returns:
        ``(vocab, merges)``: token -> id (49408 entries) and the merges as ``(left, right)`` pairs in
        priority order, the form ``tokenizers`` 0.2x expects (it rejects ``"left right"`` strings).
    """
    with gzip.open(bpe_path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")[_MERGE_LINES]
    merges = [tuple(line.split()) for line in lines]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [char + "</w>" for char in byte_chars]
    tokens += ["".join(merge) for merge in merges]
    tokens += [SOT_TOKEN, EOT_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{bpe_path}: the vocabulary built from the merges has duplicate tokens")
    return vocab, merges  # type: ignore[return-value]


class ClipTokenizer:
    """openai CLIP's tokenizer (cleaning, BPE, SOT/EOT framing), built offline on the fast HF backend.

    Use :func:`load_clip_tokenizer` rather than the constructor: building the 49408-token BPE takes about
    a second, and the tokenizer is stateless, so one shared instance is enough.

    Args:
        bpe_path: BPE vocabulary file; defaults to the one bundled with ``openai-clip``.
    """

    def __init__(self, bpe_path: str | Path | None = None) -> None:
        vocab, merges = build_openai_vocab(bpe_path if bpe_path is not None else openai_bpe_path())
        self._hf_tokenizer = transformers.CLIPTokenizer(
            vocab=vocab, merges=merges, model_max_length=CONTEXT_LENGTH
        )
        self._sot_token_id = vocab[SOT_TOKEN]
        self._eot_token_id = vocab[EOT_TOKEN]
        self._vocab_size = len(vocab)

    @property
    def hf_tokenizer(self) -> transformers.CLIPTokenizer:
        """The wrapped ``transformers.CLIPTokenizer``.

        Used on raw text it skips openai's ``ftfy``/HTML cleaning; prefer this class's methods.
        """
        return self._hf_tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of token ids (49408 for openai's vocabulary)."""
        return self._vocab_size

    @property
    def sot_token_id(self) -> int:
        """Id of ``<|startoftext|>``."""
        return self._sot_token_id

    @property
    def eot_token_id(self) -> int:
        """Id of ``<|endoftext|>``; CLIP pools the text embedding at this position."""
        return self._eot_token_id

    @property
    def pad_token_id(self) -> int:
        """Id written after EOT. It is 0 (the token ``!``) as in ``clip.tokenize``.

        Padding must be recognised through ``attention_mask`` or ``eot_positions``, never by id, since 0
        is also a real token.
        """
        return 0

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without SOT/EOT, equal to openai's ``SimpleTokenizer.encode``."""
        return self._hf_tokenizer.encode(clean_caption_text(text), add_special_tokens=False)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of a token sequence, as openai's ``SimpleTokenizer.decode`` without the trailing space.

        A leading SOT is dropped and decoding stops at the first EOT, so a padded row of
        ``input_ids`` decodes to its caption (the pad id 0 is the real token ``!``).

        Args:
            ids: token ids, a list or a 1-D tensor (L,).
        """
        id_list = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if id_list and id_list[0] == self._sot_token_id:
            id_list = id_list[1:]
        if self._eot_token_id in id_list:
            id_list = id_list[: id_list.index(self._eot_token_id)]
        return self._hf_tokenizer.decode(id_list, skip_special_tokens=True)

    def __call__(
        self, texts: Sequence[str], context_length: int = CONTEXT_LENGTH, truncate: bool = True
    ) -> dict[str, torch.Tensor]:
        """Tokenizes a batch like ``clip.tokenize``, but pads only to the longest row.

        Each row is ``[SOT] + encode(text) + [EOT]``, then padded with :attr:`pad_token_id`. A row longer
        than ``context_length`` is cut to ``context_length`` tokens and its last kept token replaced by EOT,
        exactly as ``clip.tokenize(truncate=True)``.

        Args:
            texts: B captions.
            context_length: the most tokens a row may hold, SOT and EOT included.
            truncate: cut over-long rows; if False they raise ``ValueError``.

        Returns:
            ``input_ids`` (B, L) int64, ``attention_mask`` (B, L) int64 (1 up to and including EOT) and
            ``eot_positions`` (B,) int64, with L = min(context_length, longest row).
        """
        if isinstance(texts, str):
            raise TypeError("ClipTokenizer expects a list of texts, not a single string")
        if context_length < 2:
            raise ValueError(f"context_length must leave room for SOT and EOT, got {context_length}")
        cleaned = [clean_caption_text(text) for text in texts]
        encoded = self._hf_tokenizer(cleaned, add_special_tokens=False)["input_ids"] if cleaned else []
        rows = []
        for text, ids in zip(texts, encoded, strict=True):
            row = [self._sot_token_id, *ids, self._eot_token_id]
            if len(row) > context_length:
                if not truncate:
                    raise ValueError(
                        f"text {text!r} has {len(row)} tokens with SOT/EOT, more than the context length "
                        f"{context_length}; pass truncate=True to cut it"
                    )
                row = row[:context_length]
                row[-1] = self._eot_token_id
            rows.append(row)
        length = max((len(row) for row in rows), default=0)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[index, : len(row)] = 1
        eot_positions = torch.tensor([len(row) - 1 for row in rows], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "eot_positions": eot_positions}

    def save_pretrained(self, folder: str | Path) -> None:
        """Saves the wrapped Hugging Face tokenizer (``tokenizer.json`` etc.) into ``folder``."""
        self._hf_tokenizer.save_pretrained(str(folder))


@functools.lru_cache(maxsize=1)
def load_clip_tokenizer() -> ClipTokenizer:
    """Returns the shared :class:`ClipTokenizer` over openai-clip's bundled vocabulary (built once)."""
    return ClipTokenizer()
