"""From an LM's vocabulary to CLIP's: the vocabulary bridge behind a differentiable CLIP text embedding.

The Gumbel-CLIP objective needs CLIP's embedding of a caption the captioner is still sampling, with
gradients back to the per-position token distributions ``y`` over the *LM's* vocabulary. CLIP reads
another vocabulary (openai's lower-cased BPE with ``</w>`` word ends), so two pieces bridge them:

* :class:`VocabularyBridge` knows, for every LM token id, its text, whether it starts a word and the CLIP
  token ids of that text tokenized as a standalone word. :meth:`VocabularyBridge.embedding_table` turns that
  into a (V, E) matrix in CLIP's token-embedding space. :func:`load_vocabulary_bridge` builds it once per
  (LM tokenizer, CLIP tokenizer) pair and caches it in memory and on disk.
* :class:`~clipcap.clip.soft_text.SoftClipText` (in :mod:`clipcap.clip.soft_text`) decodes each caption's hard tokens, tokenizes the text exactly as
  :meth:`ClipEncoder.encode_text` does, aligns every CLIP token with the LM tokens whose characters it
  covers, and feeds CLIP's text transformer the embeddings ``E[clip id] + mean over aligned LM positions of
  (y_t - onehot(token_t)) @ table``. For straight-through hard samples the added term is exactly zero in
  the forward pass (so the features equal ``encode_text`` of the decoded caption) and its gradient carries
  the bridge table's directions back to ``y``; in soft mode (``y = p``) the forward value moves toward the
  probability mix.

Legend for shapes: B = batch size, L = LM caption positions, V = LM vocabulary size (V' >= V when the LM's
embedding matrix is padded past its tokenizer), C = CLIP token positions (at most the context length, 77),
E = CLIP's token-embedding width, D = CLIP's projection dimension.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import logging
import os
import re
import weakref
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from clipcap.clip.tokenizer import ClipTokenizer, _bytes_to_unicode, clean_caption_text, load_clip_tokenizer
from clipcap.files import atomic_write_bytes

logger = logging.getLogger(__name__)

BRIDGE_FORMAT_VERSION = 2  # 2: is_byte_token, for byte-fallback runs decoded as the tokenizer does
"""Bumped whenever the rules that build a bridge change, so stale cache files are never read."""

BYTE_LEVEL = "byte_level"
"""GPT-2 style: token strings spell bytes with printable characters, ``Ġ`` is a space (a word start)."""
METASPACE = "metaspace"
"""SentencePiece style: ``▁`` is a space (a word start), ``<0xNN>`` tokens are raw bytes (byte fallback)."""
PLAIN = "plain"
"""Token strings are their own text, concatenated without separators (the fallback; not right for
WordPiece or word-level tokenizers, whose decoders insert spaces between tokens)."""

_METASPACE_CHAR = "\u2581"
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


# ------------------------------------------------------------------------------------------ the bridge


def default_bridge_cache_dir() -> Path:
    """Where bridges are cached: ``$CLIPCAP_CACHE/bridges``, else ``~/.cache/clipcap/bridges``."""
    if os.environ.get("CLIPCAP_CACHE"):
        return Path(os.environ["CLIPCAP_CACHE"]).expanduser() / "bridges"
    return Path.home() / ".cache" / "clipcap" / "bridges"


def detect_token_scheme(tokenizer: PreTrainedTokenizerBase) -> str:
    """How ``tokenizer``'s token strings spell text: :data:`BYTE_LEVEL`, :data:`METASPACE` or :data:`PLAIN`.

    A fast tokenizer's decoder says it (``ByteLevel``; ``Metaspace`` or a ``Replace`` of ``▁``, as
    LLaMA's). Otherwise the vocabulary decides: many tokens starting with ``Ġ`` mean byte-level, with ``▁``
    SentencePiece.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        decoder = json.loads(backend.to_str()).get("decoder")
        found = _decoder_scheme(decoder)
        if found is not None:
            return found
    tokens = list(tokenizer.get_vocab())
    byte_starts = sum(token.startswith("\u0120") for token in tokens)
    metaspace_starts = sum(token.startswith(_METASPACE_CHAR) for token in tokens)
    threshold = max(1, len(tokens) // 20)
    if byte_starts >= threshold and byte_starts >= metaspace_starts:
        return BYTE_LEVEL
    if metaspace_starts >= threshold:
        return METASPACE
    return PLAIN


def _decoder_scheme(decoder: dict | None) -> str | None:
    if not decoder:
        return None
    kind = decoder.get("type")
    if kind == "ByteLevel":
        return BYTE_LEVEL
    if kind == "Metaspace":
        return METASPACE
    if kind == "Replace" and decoder.get("pattern", {}).get("String") == _METASPACE_CHAR:
        return METASPACE
    if kind == "Sequence":
        for part in decoder.get("decoders", []):
            found = _decoder_scheme(part)
            if found is not None:
                return found
    return None


def _special_token_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    special = {int(i) for i in tokenizer.all_special_ids}
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            special.add(int(token_id))
    return special


def _token_bytes_function(scheme: str) -> Callable[[str], bytes]:
    """The function from a token string to the bytes it stands for, under ``scheme``."""
    if scheme == BYTE_LEVEL:
        byte_of = {char: byte for byte, char in _bytes_to_unicode().items()}

        def byte_level(token: str) -> bytes:
            try:
                return bytes(byte_of[char] for char in token)
            except KeyError:  # an added token stored as raw text
                return token.encode("utf-8")

        return byte_level
    if scheme == METASPACE:

        def metaspace(token: str) -> bytes:
            match = _BYTE_FALLBACK.fullmatch(token)
            if match:
                return bytes([int(match.group(1), 16)])
            return token.replace(_METASPACE_CHAR, " ").encode("utf-8")

        return metaspace
    if scheme == PLAIN:
        return lambda token: token.encode("utf-8")
    raise ValueError(f"unknown token scheme {scheme!r}; expected {BYTE_LEVEL!r}, {METASPACE!r} or {PLAIN!r}")


_CLIP_DIGESTS: weakref.WeakKeyDictionary[ClipTokenizer, str] = weakref.WeakKeyDictionary()


def _clip_tokenizer_digest(clip_tokenizer: ClipTokenizer) -> str:
    """sha256 of everything that decides how ``clip_tokenizer`` splits text (vocabulary, merges, rules).

    The runtime truncation and padding settings are left out: they change with calls, not with the
    vocabulary.
    """
    digest = _CLIP_DIGESTS.get(clip_tokenizer)
    if digest is None:
        spec = json.loads(clip_tokenizer.hf_tokenizer.backend_tokenizer.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode("utf-8")).hexdigest()
        _CLIP_DIGESTS[clip_tokenizer] = digest
    return digest


def _bridge_key(scheme: str, tokens: Sequence[str | None], special: set[int], clip_digest: str) -> str:
    """Hash of both vocabularies and of the build rules: the bridge is a function of exactly these."""
    digest = hashlib.sha256()
    digest.update(f"clipcap-vocabulary-bridge-v{BRIDGE_FORMAT_VERSION}\0{scheme}\0{clip_digest}\0".encode())
    for index, token in enumerate(tokens):
        flag = "S" if index in special else "T"
        digest.update(f"{flag}{'' if token is None else token}\0".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class _LmVocabulary:
    scheme: str
    tokens: list[str | None]
    special: set[int]


def _read_lm_vocabulary(lm_tokenizer: PreTrainedTokenizerBase) -> _LmVocabulary:
    vocab_size = len(lm_tokenizer)
    tokens = lm_tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    return _LmVocabulary(detect_token_scheme(lm_tokenizer), list(tokens), _special_token_ids(lm_tokenizer))


class VocabularyBridge:
    """For every LM token id: its text, whether it starts a word, and its CLIP token ids.

    Rules:

    * **Text.** Byte-level (GPT-2) token strings are mapped back to bytes (``Ġ`` is a space); SentencePiece
      ``▁`` is a space and ``<0xNN>`` byte-fallback tokens are that byte; other token strings are their own
      text. Special tokens (EOS, BOS, pad, added special tokens) have no text and map to nothing. A caption's
      text is what the tokenizer's ``decode`` gives: byte-level bytes are decoded together, invalid UTF-8
      replaced by one U+FFFD per invalid stretch; a run of consecutive byte-fallback tokens is decoded as a
      whole, and when it is not valid UTF-8 each of its bytes becomes one U+FFFD (tokenizers' ByteFallback).
    * **Word start.** A token starts a new word when its text starts with whitespace (``Ġ``/``▁``).
    * **CLIP ids.** The token's text, cleaned as CLIP cleans captions (:func:`clean_caption_text`: leading
      space stripped, lower-cased) and tokenized as a standalone word, so the last piece carries ``</w>``:
      ``Ġred`` -> ``red</w>``, and the continuation ``ing`` -> ``ing</w>``. A token whose text is not valid
      UTF-8 on its own (a piece of a multi-byte character) or is only whitespace maps to no CLIP token.
    * **Table row** (:meth:`embedding_table`): the mean of the CLIP token embeddings of the token's CLIP ids,
      so a token that is exactly one CLIP token gets that token's embedding; a token spanning several CLIP
      tokens (``Ġred.`` -> ``red</w>``, ``.</w>``) gets their mean; a token with none gets a zero row. The
      rows are only used as gradient directions and for the soft-mode forward value: the hard forward
      value always comes from tokenizing the whole decoded caption (see :class:`SoftClipText`).

    Build with :func:`load_vocabulary_bridge` (cached); :meth:`build` always builds.

    Args:
        key: hash of both vocabularies and the build rules (names the disk cache file).
        scheme: the LM token scheme (:data:`BYTE_LEVEL`, :data:`METASPACE` or :data:`PLAIN`).
        token_bytes: (sum of byte lengths,) uint8, every token's bytes back to back.
        byte_offsets: (V + 1,) int64, token v's bytes are ``token_bytes[byte_offsets[v]:byte_offsets[v+1]]``.
        is_special: (V,) bool.
        starts_word: (V,) bool.
        is_byte_token: (V,) bool, the SentencePiece byte-fallback tokens ``<0xNN>``.
        clip_ids: (sum of CLIP id counts,) int64, every token's CLIP ids back to back.
        clip_offsets: (V + 1,) int64, as ``byte_offsets`` for ``clip_ids``.
    """

    _ARRAYS = (
        "token_bytes",
        "byte_offsets",
        "is_special",
        "starts_word",
        "clip_ids",
        "clip_offsets",
        "is_byte_token",
    )

    def __init__(
        self,
        key: str,
        scheme: str,
        token_bytes: np.ndarray,
        byte_offsets: np.ndarray,
        is_special: np.ndarray,
        starts_word: np.ndarray,
        clip_ids: np.ndarray,
        clip_offsets: np.ndarray,
        is_byte_token: np.ndarray,
    ) -> None:
        if is_special.ndim != 1:
            raise ValueError(
                f"inconsistent VocabularyBridge: is_special must be (V,), got {is_special.shape}"
            )
        vocab_size = len(is_special)
        problems = []
        if scheme not in (BYTE_LEVEL, METASPACE, PLAIN):
            problems.append(f"unknown scheme {scheme!r}")
        for name, offsets, flat in (
            ("byte_offsets", byte_offsets, token_bytes),
            ("clip_offsets", clip_offsets, clip_ids),
        ):
            if offsets.shape != (vocab_size + 1,):
                problems.append(f"{name} has shape {offsets.shape}, expected ({vocab_size + 1},)")
            elif offsets[0] != 0 or offsets[-1] != len(flat) or np.any(np.diff(offsets) < 0):
                problems.append(f"{name} do not index their {len(flat)} entries in order")
        for name, flags in (("starts_word", starts_word), ("is_byte_token", is_byte_token)):
            if flags.shape != (vocab_size,):
                problems.append(f"{name} has shape {flags.shape}, expected ({vocab_size},)")
        if clip_ids.size and clip_ids.min() < 0:
            problems.append("clip_ids holds negative ids")
        if problems:
            raise ValueError("inconsistent VocabularyBridge: " + "; ".join(problems))
        self.key = key
        self.scheme = scheme
        self._token_bytes = np.ascontiguousarray(token_bytes, dtype=np.uint8)
        self._byte_offsets = np.ascontiguousarray(byte_offsets, dtype=np.int64)
        self._is_special = np.ascontiguousarray(is_special, dtype=bool)
        self._starts_word = np.ascontiguousarray(starts_word, dtype=bool)
        self._clip_ids = np.ascontiguousarray(clip_ids, dtype=np.int64)
        self._clip_offsets = np.ascontiguousarray(clip_offsets, dtype=np.int64)
        self._is_byte_token = np.ascontiguousarray(is_byte_token, dtype=bool)
        blob = self._token_bytes.tobytes()
        self._bytes_list = [
            blob[start:end] for start, end in zip(byte_offsets[:-1], byte_offsets[1:], strict=True)
        ]

    # ---------------------------------------------------------------------------------------- building

    @classmethod
    def build(
        cls, lm_tokenizer: PreTrainedTokenizerBase, clip_tokenizer: ClipTokenizer | None = None
    ) -> VocabularyBridge:
        """Builds the bridge from the two tokenizers, without any cache (see :func:`load_vocabulary_bridge`).

        Args:
            lm_tokenizer: the causal LM's tokenizer; V = ``len(lm_tokenizer)``.
            clip_tokenizer: CLIP's tokenizer; the shared openai one when None.
        """
        clip_tokenizer = clip_tokenizer or load_clip_tokenizer()
        vocabulary = _read_lm_vocabulary(lm_tokenizer)
        key = _bridge_key(
            vocabulary.scheme, vocabulary.tokens, vocabulary.special, _clip_tokenizer_digest(clip_tokenizer)
        )
        return cls._build(key, vocabulary, clip_tokenizer)

    @classmethod
    def _build(cls, key: str, vocabulary: _LmVocabulary, clip_tokenizer: ClipTokenizer) -> VocabularyBridge:
        to_bytes = _token_bytes_function(vocabulary.scheme)
        vocab_size = len(vocabulary.tokens)
        byte_list: list[bytes] = []
        is_special = np.zeros(vocab_size, dtype=bool)
        starts_word = np.zeros(vocab_size, dtype=bool)
        is_byte_token = np.zeros(vocab_size, dtype=bool)
        words: list[str] = []
        word_rows: list[int] = []
        for index, token in enumerate(vocabulary.tokens):
            if token is None or index in vocabulary.special:
                is_special[index] = True
                byte_list.append(b"")
                continue
            data = to_bytes(token)
            byte_list.append(data)
            is_byte_token[index] = vocabulary.scheme == METASPACE and bool(_BYTE_FALLBACK.fullmatch(token))
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:  # part of a multi-byte character: no text of its own
                continue
            starts_word[index] = text[:1].isspace()
            cleaned = clean_caption_text(text)
            if cleaned:
                words.append(cleaned)
                word_rows.append(index)
        # One batched call into the Rust tokenizer: tens of thousands of words take well under a second.
        encoded = clip_tokenizer.hf_tokenizer(words, add_special_tokens=False)["input_ids"] if words else []
        counts = np.zeros(vocab_size, dtype=np.int64)
        per_row: list[list[int]] = [[] for _ in range(vocab_size)]
        for row, ids in zip(word_rows, encoded, strict=True):
            per_row[row] = ids
            counts[row] = len(ids)
        clip_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        clip_ids = np.fromiter((i for ids in per_row for i in ids), dtype=np.int64, count=int(counts.sum()))
        byte_lengths = np.fromiter((len(b) for b in byte_list), dtype=np.int64, count=vocab_size)
        byte_offsets = np.concatenate([[0], np.cumsum(byte_lengths)]).astype(np.int64)
        token_bytes = np.frombuffer(b"".join(byte_list), dtype=np.uint8)
        return cls(
            key,
            vocabulary.scheme,
            token_bytes,
            byte_offsets,
            is_special,
            starts_word,
            clip_ids,
            clip_offsets,
            is_byte_token,
        )

    # ------------------------------------------------------------------------------------------ saving

    def to_bytes(self) -> bytes:
        """The bridge as ``.npz`` bytes (plain arrays, no pickle)."""
        buffer = io.BytesIO()
        np.savez(
            buffer,
            format_version=np.array(BRIDGE_FORMAT_VERSION, dtype=np.int64),
            key=np.array(self.key),
            scheme=np.array(self.scheme),
            token_bytes=self._token_bytes,
            byte_offsets=self._byte_offsets,
            is_special=self._is_special,
            starts_word=self._starts_word,
            clip_ids=self._clip_ids,
            clip_offsets=self._clip_offsets,
            is_byte_token=self._is_byte_token,
        )
        return buffer.getvalue()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the bridge to ``path`` (``.npz``) atomically; returns the path."""
        return atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike[str], expected_key: str | None = None) -> VocabularyBridge:
        """Reads a bridge written by :meth:`save`.

        Args:
            path: the ``.npz`` file.
            expected_key: refuse a file whose key differs (a cache file for other tokenizers).

        Raises:
            ValueError: the file is not a complete bridge of this format (or has another key).
            OSError: it cannot be read.
        """
        try:
            with np.load(path, allow_pickle=False) as archive:
                contents = {name: archive[name] for name in archive.files}
        except (zipfile.BadZipFile, EOFError, KeyError) as error:
            raise ValueError(f"{path} is not a readable bridge file: {error}") from error
        missing = {"format_version", "key", "scheme", *cls._ARRAYS} - set(contents)
        if missing:
            raise ValueError(f"{path} is not a bridge file: it lacks {sorted(missing)}")
        version = int(contents["format_version"])
        if version != BRIDGE_FORMAT_VERSION:
            raise ValueError(f"{path} holds a bridge of format {version}, not {BRIDGE_FORMAT_VERSION}")
        key = str(contents["key"])
        if expected_key is not None and key != expected_key:
            raise ValueError(f"{path} holds the bridge {key}, not {expected_key}")
        return cls(key, str(contents["scheme"]), *(contents[name] for name in cls._ARRAYS))

    # ---------------------------------------------------------------------------------------- querying

    @property
    def vocab_size(self) -> int:
        """V, the number of LM token ids the bridge covers (``len(lm_tokenizer)``)."""
        return len(self._is_special)

    @property
    def starts_word(self) -> np.ndarray:
        """(V,) bool: the token's text starts with whitespace (``Ġ``/``▁``)."""
        return self._starts_word

    @property
    def is_special(self) -> np.ndarray:
        """(V,) bool: special tokens, which have no text and map to no CLIP token."""
        return self._is_special

    @property
    def clip_id_counts(self) -> np.ndarray:
        """(V,) int64: how many CLIP tokens each LM token maps to (0 for special and whitespace tokens)."""
        return np.diff(self._clip_offsets)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token ``token_id`` stands for (empty for special tokens and ids past the vocabulary)."""
        return self._bytes_list[token_id] if token_id < len(self._bytes_list) else b""

    def token_text(self, token_id: int) -> str:
        """The text of ``token_id``, leading space included; invalid UTF-8 pieces show as ``\\ufffd``."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def clip_ids(self, token_id: int) -> list[int]:
        """The CLIP token ids of ``token_id``'s text as a standalone word (empty if it maps to nothing)."""
        start, end = self._clip_offsets[token_id], self._clip_offsets[token_id + 1]
        return self._clip_ids[start:end].tolist()

    def is_byte_token(self, token_id: int) -> bool:
        """Whether ``token_id`` is a SentencePiece byte-fallback token ``<0xNN>``."""
        return token_id < len(self._is_byte_token) and bool(self._is_byte_token[token_id])

    def decode(self, token_ids: Sequence[int] | torch.Tensor) -> str:
        """Text of a caption's tokens, special tokens dropped, stripped (as ``batch_decode(...).strip()``,
        invalid UTF-8 included: see the class's rules).

        This is the text :class:`SoftClipText` tokenizes for CLIP (CLIP's cleaning strips it anyway).
        """
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids
        return decode_with_owners(self, ids)[0].strip()

    def embedding_table(self, clip_token_embedding: torch.Tensor) -> torch.Tensor:
        """Each LM token's row in CLIP's token-embedding space.

        Args:
            clip_token_embedding: (V_clip, E) CLIP's token embedding matrix
                (``text_model.embeddings.token_embedding.weight``).

        Returns:
            (V, E) in the matrix's dtype and device: row v is the mean of the embeddings of v's CLIP ids
            (exactly the CLIP embedding when there is one id), zero when v maps to no CLIP token.
        """
        if clip_token_embedding.dim() != 2:
            raise ValueError(
                f"clip_token_embedding must be (V_clip, E), got {tuple(clip_token_embedding.shape)}"
            )
        if self._clip_ids.size and int(self._clip_ids.max()) >= clip_token_embedding.shape[0]:
            raise ValueError(
                f"the bridge maps to CLIP id {int(self._clip_ids.max())} but the embedding matrix has only "
                f"{clip_token_embedding.shape[0]} rows: it belongs to another CLIP vocabulary"
            )
        device = clip_token_embedding.device
        counts = torch.from_numpy(self.clip_id_counts).to(device)
        rows = torch.repeat_interleave(torch.arange(self.vocab_size, device=device), counts)
        clip_ids = torch.from_numpy(self._clip_ids).to(device)
        weights = (1.0 / counts.clamp(min=1).to(torch.float64))[rows].to(clip_token_embedding.dtype)
        table = clip_token_embedding.new_zeros((self.vocab_size, clip_token_embedding.shape[1]))
        # A token with one CLIP id gets 1.0 * its embedding, bit for bit CLIP's own row.
        return table.index_add(0, rows, clip_token_embedding[clip_ids] * weights[:, None])

    def __repr__(self) -> str:
        mapped = int((self.clip_id_counts > 0).sum())
        return (
            f"VocabularyBridge(key={self.key!r}, scheme={self.scheme!r}, vocab_size={self.vocab_size}, "
            f"mapped={mapped})"
        )


_BRIDGES: dict[str, VocabularyBridge] = {}


def decode_with_owners(bridge: VocabularyBridge, token_ids: Sequence[int]) -> tuple[str, list[list[int]]]:
    """A caption's text, as the LM tokenizer's ``decode`` gives it, and, for each character, the caption
    positions whose bytes it is made of.

    A character split over several tokens (byte-level pieces of one multi-byte character, or a run of
    byte-fallback tokens) belongs to all of them; special tokens have no bytes and own nothing.
    """
    if bridge.scheme == METASPACE:
        return _decode_byte_fallback(bridge, token_ids)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    chars: list[str] = []
    owners: list[list[int]] = []
    pending: list[int] = []

    def emit(text: str, position: int | None) -> None:
        nonlocal pending
        for index, char in enumerate(text):
            chars.append(char)
            owners.append(list(pending) if index == 0 or position is None else [position])
        pending = []

    for position, token_id in enumerate(token_ids):
        data = bridge.token_bytes(token_id)
        if not data:
            continue
        pending.append(position)
        text = decoder.decode(data)
        if text:
            emit(text, position)
            if decoder.getstate()[0]:  # the token's last bytes start a character that is not complete yet
                pending = [position]
    tail = decoder.decode(b"", final=True)
    if tail:
        emit(tail, None)
    return "".join(chars), owners


def _decode_byte_fallback(bridge: VocabularyBridge, token_ids: Sequence[int]) -> tuple[str, list[list[int]]]:
    """SentencePiece decoding with byte fallback, as tokenizers' ``ByteFallback`` decoder does it: a run of
    consecutive ``<0xNN>`` tokens (special tokens, dropped, do not end it) becomes its UTF-8 text when the
    run is valid as a whole, else one U+FFFD per byte; every other token is its own text."""
    chars: list[str] = []
    owners: list[list[int]] = []
    run: list[tuple[int, int]] = []  # (byte, caption position)

    def flush() -> None:
        data = bytes(byte for byte, _ in run)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            chars.extend("\ufffd" for _ in run)
            owners.extend([position] for _, position in run)
        else:
            start = 0
            for char in text:
                width = len(char.encode("utf-8"))
                chars.append(char)
                owners.append(sorted({position for _, position in run[start : start + width]}))
                start += width
        run.clear()

    for position, token_id in enumerate(token_ids):
        data = bridge.token_bytes(token_id)
        if not data:
            continue
        if bridge.is_byte_token(token_id):
            run.append((data[0], position))
            continue
        flush()
        for char in data.decode("utf-8", errors="replace"):
            chars.append(char)
            owners.append([position])
    flush()
    return "".join(chars), owners


def load_vocabulary_bridge(
    lm_tokenizer: PreTrainedTokenizerBase,
    clip_tokenizer: ClipTokenizer | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    use_disk_cache: bool = True,
) -> VocabularyBridge:
    """The bridge for (``lm_tokenizer``, ``clip_tokenizer``), built once and cached in memory and on disk.

    The cache key hashes both vocabularies (the LM's token strings and special ids, CLIP's vocabulary,
    merges and rules) and the build rules' version, so another tokenizer never reads a stale file. The
    file is written atomically; one that cannot be read (truncated, corrupt, another format) is logged,
    rebuilt and replaced.

    Args:
        lm_tokenizer: the causal LM's tokenizer.
        clip_tokenizer: CLIP's tokenizer; the shared openai one when None.
        cache_dir: folder of ``<key>.npz`` files; :func:`default_bridge_cache_dir` when None.
        use_disk_cache: False keeps the bridge in memory only.
    """
    clip_tokenizer = clip_tokenizer or load_clip_tokenizer()
    vocabulary = _read_lm_vocabulary(lm_tokenizer)
    key = _bridge_key(
        vocabulary.scheme, vocabulary.tokens, vocabulary.special, _clip_tokenizer_digest(clip_tokenizer)
    )
    bridge = _BRIDGES.get(key)
    if bridge is not None:
        return bridge
    path = Path(cache_dir) if cache_dir is not None else default_bridge_cache_dir()
    path = path.expanduser() / f"{key}.npz"
    if use_disk_cache and path.is_file():
        try:
            bridge = VocabularyBridge.load(path, expected_key=key)
        except (OSError, ValueError) as error:
            logger.warning("rebuilding the vocabulary bridge: cannot use the cache file %s (%s)", path, error)
    if bridge is None:
        bridge = VocabularyBridge._build(key, vocabulary, clip_tokenizer)
        if use_disk_cache:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                bridge.save(path)
            except OSError as error:  # a read-only cache folder must not stop training
                logger.warning("cannot cache the vocabulary bridge at %s: %s", path, error)
    _BRIDGES[key] = bridge
    return bridge
