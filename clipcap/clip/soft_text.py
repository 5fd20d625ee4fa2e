"""The differentiable CLIP text path of captions given as distributions over an LM's vocabulary.

:class:`SoftClipText` decodes each caption's hard tokens, tokenizes the text exactly as
:meth:`ClipEncoder.encode_text` does, aligns every CLIP token with the LM tokens whose characters it covers
(:func:`align_captions`), and feeds CLIP's text transformer the embeddings ``E[clip id] + mean over aligned
LM positions of (y_t - onehot(token_t)) @ table``, the table being the vocabulary bridge's
(:mod:`clipcap.clip.bridge`). For straight-through hard samples the added term is exactly zero in the
forward pass (so the features equal ``encode_text`` of the decoded caption) and its gradient carries the
bridge table's directions back to ``y``; in soft mode (``y = p``) the forward value moves toward the
probability mix.

Legend for shapes: B = batch size, L = LM caption positions, V = LM vocabulary size (V' >= V when the LM's
embedding matrix is padded past its tokenizer), C = CLIP token positions (at most the context length, 77),
E = CLIP's token-embedding width, D = CLIP's projection dimension.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from clipcap.clip.bridge import VocabularyBridge, decode_with_owners, load_vocabulary_bridge
from clipcap.clip.encoder import ClipEncoder
from clipcap.clip.tokenizer import ClipTokenizer, clean_caption_text
from clipcap.compat import causal_mask
from clipcap.frozen import keep_unregistered


@dataclass
class ClipAlignment:
    """CLIP tokens of decoded captions and which LM positions each covers.

    Attributes:
        texts: B decoded captions (what :meth:`ClipEncoder.encode_text` would be given).
        input_ids: (B, C) int64 CLIP ids, ``[SOT] + ids + [EOT]`` padded, as ``ClipTokenizer.__call__``.
        attention_mask: (B, C) int64, 1 up to and including EOT.
        eot_positions: (B,) int64.
        batch_index: (N,) int64, one entry per (CLIP position, LM position) link.
        clip_position: (N,) int64, the CLIP position c of the link.
        lm_position: (N,) int64, the LM position t of the link.
        weight: (N,) float32, ``1 / (number of LM positions linked to c)``.
    """

    texts: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    eot_positions: torch.Tensor
    batch_index: torch.Tensor
    clip_position: torch.Tensor
    lm_position: torch.Tensor
    weight: torch.Tensor


_SPACE_RUN = re.compile(r"\s+")


def _cleaned_to_raw(raw: str, cleaned: str) -> list[tuple[int, int]]:
    """For each character of ``cleaned = clean_caption_text(raw)``, the ``raw`` characters it came from.

    Returns one ``(start, end)`` range of ``raw`` per character of ``cleaned``. The common case (cleaning only folded whitespace, stripped and lower-cased) is mapped exactly. When
    ftfy or HTML unescaping changed other characters, a character diff maps matching runs exactly and each
    changed run of ``cleaned`` to the whole changed run of ``raw``.
    """
    folded_chars: list[str] = []
    folded_source: list[int] = []
    index = 0
    while index < len(raw):
        char = raw[index]
        if char.isspace():
            match = _SPACE_RUN.match(raw, index)
            end = match.end() if match else index + 1
            folded_chars.append(" ")
            folded_source.append(index)
            index = end
            continue
        for lowered in char.lower():
            folded_chars.append(lowered)
            folded_source.append(index)
        index += 1
    while folded_chars and folded_chars[0] == " ":
        folded_chars.pop(0)
        folded_source.pop(0)
    while folded_chars and folded_chars[-1] == " ":
        folded_chars.pop()
        folded_source.pop()
    folded = "".join(folded_chars)
    if folded == cleaned:
        return [(source, source + 1) for source in folded_source]
    mapping: list[tuple[int, int]] = []
    deleted: list[tuple[int, int, int]] = []  # (cleaned index after the deletion, raw start, raw end)
    matcher = difflib.SequenceMatcher(None, folded, cleaned, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            mapping.extend((folded_source[i], folded_source[i] + 1) for i in range(i1, i2))
        elif tag == "replace":
            span = (folded_source[i1], folded_source[i2 - 1] + 1)
            mapping.extend([span] * (j2 - j1))
        elif tag == "insert":  # characters cleaning added: tie them to their neighbours in raw
            low = folded_source[i1 - 1] if i1 > 0 else (folded_source[0] if folded_source else 0)
            high = folded_source[i1] + 1 if i1 < len(folded_source) else low + 1
            mapping.extend([(low, max(high, low + 1))] * (j2 - j1))
        else:  # "delete": raw characters cleaning removed ("amp;" of "&amp;" -> "&")
            deleted.append((j1, folded_source[i1], folded_source[i2 - 1] + 1))
    # A removed run joins the cleaned character before it (the "&" it was part of), or the one after it
    # when that is a space or there is none, so the LM tokens that spelled it stay linked.
    for after, start, end in deleted:
        if after > 0 and not cleaned[after - 1].isspace():
            target = after - 1
        elif after < len(mapping):
            target = after
        else:
            continue
        low, high = mapping[target]
        mapping[target] = (min(low, start), max(high, end))
    return mapping


def align_captions(
    bridge: VocabularyBridge,
    clip_tokenizer: ClipTokenizer,
    token_ids: torch.Tensor,
    lengths: torch.Tensor,
    context_length: int,
) -> ClipAlignment:
    """Tokenizes decoded captions for CLIP as ``encode_text`` does and links CLIP tokens to LM positions.

    Each row's tokens before its length are decoded (:meth:`VocabularyBridge.decode`), cleaned and
    tokenized by CLIP's fast tokenizer with character offsets. CLIP position c (1-based after SOT) links to
    every LM position that owns a character inside CLIP token c's span, widened to the left over the
    whitespace before it (so a whitespace-only LM token is linked to the word it starts). Rows longer than
    the context length keep their first ``context_length - 2`` CLIP tokens and end with EOT, exactly as
    ``ClipTokenizer(truncate=True)``; an empty caption is ``[SOT, EOT]``. Special tokens and ids past the
    tokenizer's vocabulary (rows of a padded LM embedding matrix) have no text and link to nothing.

    Args:
        bridge: the LM tokenizer's bridge.
        clip_tokenizer: CLIP's tokenizer.
        token_ids: (B, L) hard LM token ids (non-negative).
        lengths: (B,) caption tokens before the stop; later positions are ignored.
        context_length: the most CLIP positions a row may hold, SOT and EOT included.

    Returns:
        The CLIP batch and its links, all on the CPU.
    """
    if token_ids.dim() != 2:
        raise ValueError(f"token_ids must be (B, L), got shape {tuple(token_ids.shape)}")
    if lengths.shape != token_ids.shape[:1]:
        raise ValueError(f"lengths must be (B,) = ({token_ids.shape[0]},), got shape {tuple(lengths.shape)}")
    if context_length < 2:
        raise ValueError(f"context_length must leave room for SOT and EOT, got {context_length}")
    length_list = lengths.tolist()
    if any(n < 0 or n > token_ids.shape[1] for n in length_list):
        raise ValueError(f"lengths must lie in [0, {token_ids.shape[1]}], got {length_list}")
    rows = [row[:n] for row, n in zip(token_ids.tolist(), length_list, strict=True)]
    if any(i < 0 for row in rows for i in row):
        raise ValueError("caption token ids must be non-negative (positions before each row's length)")
    raws, owner_lists, cleaned = [], [], []
    for row in rows:
        raw, owners = decode_with_owners(bridge, row)
        raws.append(raw)
        owner_lists.append(owners)
        cleaned.append(clean_caption_text(raw))
    encoded = clip_tokenizer.hf_tokenizer(cleaned, add_special_tokens=False, return_offsets_mapping=True)
    sot, eot = clip_tokenizer.sot_token_id, clip_tokenizer.eot_token_id
    clip_rows: list[list[int]] = []
    links: list[tuple[int, int, int, float]] = []
    for b, (raw, owners, text) in enumerate(zip(raws, owner_lists, cleaned, strict=True)):
        ids = encoded["input_ids"][b][: context_length - 2]
        offsets = encoded["offset_mapping"][b][: len(ids)]
        to_raw = _cleaned_to_raw(raw, text)
        clip_rows.append([sot, *ids, eot])
        for k, (start, end) in enumerate(offsets):
            if end <= start:
                continue
            raw_start = min(to_raw[c][0] for c in range(start, end))
            raw_end = max(to_raw[c][1] for c in range(start, end))
            # The whitespace before a word belongs to it (as GPT-2's `Ġ`), so a whitespace-only LM token
            # (a lone `Ġ` or `▁`) is linked to the word it introduces rather than to nothing.
            while raw_start > 0 and raw[raw_start - 1].isspace():
                raw_start -= 1
            linked = sorted({t for c in range(raw_start, raw_end) for t in owners[c]})
            for t in linked:
                links.append((b, k + 1, t, 1.0 / len(linked)))
    width = max((len(row) for row in clip_rows), default=0)
    input_ids = torch.full((len(rows), width), clip_tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(clip_rows):
        input_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[b, : len(row)] = 1
    link_columns = list(zip(*links, strict=True)) if links else [(), (), (), ()]
    return ClipAlignment(
        texts=[raw.strip() for raw in raws],
        input_ids=input_ids,
        attention_mask=attention_mask,
        eot_positions=torch.tensor([len(row) - 1 for row in clip_rows], dtype=torch.long),
        batch_index=torch.tensor(link_columns[0], dtype=torch.long),
        clip_position=torch.tensor(link_columns[1], dtype=torch.long),
        lm_position=torch.tensor(link_columns[2], dtype=torch.long),
        weight=torch.tensor(link_columns[3], dtype=torch.float32),
    )


class SoftClipText(nn.Module):
    """CLIP text embeddings of captions given as per-position distributions over the LM's vocabulary.

    ``encode(y, token_ids, lengths)`` tokenizes each decoded caption as :meth:`ClipEncoder.encode_text`
    does and runs CLIP's text transformer on the input embeddings

        ``x_c = E[clip_id_c] + mean_{t linked to c} (y_t - onehot(token_t)) @ table``

    where ``table`` is :meth:`VocabularyBridge.embedding_table` of CLIP's token embeddings and the links come
    from character offsets (:func:`align_captions`). SOT, EOT and padding get no term. Consequences:

    * straight-through hard ``y`` (one-hot forward value): ``y_t @ table`` equals ``table[token_t]`` exactly,
      so the features equal ``encode_text`` of the decoded caption, while ``d x_c / d y_t[v] = table[v] /
      n_c`` routes CLIP's gradient to every vocabulary entry;
    * soft ``y = p``: each CLIP token moves by the bridge-embedding mix ``(p_t - onehot) @ table``;
    * an LM token covering several CLIP tokens adds its term to each of them; a CLIP token covering several
      LM tokens (a word split by the LM) averages theirs; LM tokens whose CLIP tokens were truncated away,
      special tokens and positions at or after the stop get no gradient.

    The CLIP stays frozen (no parameter gradients) and is kept out of this module's tree, as the project
    keeps frozen encoders: ``state_dict()`` and ``parameters()`` are empty, and the table is a non-persistent
    buffer, so checkpoints carry neither. Moving this module (``.to``, ``.cuda``, ``.half``) moves the CLIP
    too.

    Args:
        clip: the frozen CLIP encoder.
        bridge: the bridge of the captioner's LM tokenizer and ``clip.tokenizer``
            (see :meth:`from_lm_tokenizer`).
    """

    table: torch.Tensor

    def __init__(self, clip: ClipEncoder, bridge: VocabularyBridge) -> None:
        super().__init__()
        keep_unregistered(self, "_clip", clip)
        self.bridge = bridge
        with torch.no_grad():
            token_embedding = clip.model.text_model.embeddings.token_embedding.weight
            table = bridge.embedding_table(token_embedding.detach())
        self.register_buffer("table", table, persistent=False)

    @classmethod
    def from_lm_tokenizer(
        cls,
        clip: ClipEncoder,
        lm_tokenizer: PreTrainedTokenizerBase,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> SoftClipText:
        """Builds (or reads from cache) the bridge of ``lm_tokenizer`` and ``clip.tokenizer``."""
        return cls(clip, load_vocabulary_bridge(lm_tokenizer, clip.tokenizer, cache_dir=cache_dir))

    @property
    def clip(self) -> ClipEncoder:
        """The frozen CLIP encoder."""
        return self._clip

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> SoftClipText:
        # The CLIP is outside the module tree (no checkpoint copy); device and dtype moves still reach it.
        super()._apply(fn, recurse)
        self.clip._apply(fn, recurse)
        return self

    def align(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> ClipAlignment:
        """The CLIP tokens of the decoded captions and their links to LM positions (see :func:`align_captions`)."""
        return align_captions(
            self.bridge,
            self.clip.tokenizer,
            token_ids.detach().cpu(),
            lengths.detach().cpu(),
            self.clip.context_length,
        )

    def captions(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        """B decoded captions, the texts :meth:`encode` embeds."""
        return [
            self.bridge.decode(row[:n]) for row, n in zip(token_ids.tolist(), lengths.tolist(), strict=True)
        ]

    def encode(self, y: torch.Tensor, token_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Projected CLIP text embeddings of the captions, differentiable w.r.t. ``y``.

        Args:
            y: (B, L, V') per-position vectors over the LM vocabulary: straight-through one-hots
                (``onehot + p - p.detach()``) or probabilities. Columns past the bridge's V (a padded LM
                embedding matrix) have no text and are ignored.
            token_ids: (B, L) the hard tokens (argmax or sample) whose text CLIP reads.
            lengths: (B,) caption tokens before the stop.

        Returns:
            (B, D) float32 embeddings, not normalised; equal to ``clip.encode_text(captions)`` when ``y``
            is one-hot in value.
        """
        if y.dim() != 3 or y.shape[:2] != token_ids.shape:
            raise ValueError(
                f"y must be (B, L, V) matching token_ids {tuple(token_ids.shape)}, got {tuple(y.shape)}"
            )
        vocab_size = self.bridge.vocab_size
        if y.shape[-1] < vocab_size:
            raise ValueError(
                f"y has {y.shape[-1]} vocabulary columns but the LM tokenizer has {vocab_size} tokens: "
                "the bridge belongs to another LM"
            )
        model = self.clip.model
        device, dtype = self.table.device, self.table.dtype
        if self.clip.device != device:
            raise RuntimeError(
                f"SoftClipText's bridge table is on {device} but its CLIP is on {self.clip.device}: move "
                "the SoftClipText (or the module holding it) with .to(device), which moves both"
            )
        alignment = self.align(token_ids, lengths)
        batch, positions = token_ids.shape
        clip_positions = alignment.input_ids.shape[1]

        # (B, L, E): how far each position's y is from its hard token's one-hot, in bridge-embedding space.
        hard = token_ids.to(device)
        delta = torch.matmul(y[..., :vocab_size].to(device=device, dtype=dtype), self.table)
        # Positions at or after the stop (padding) and ids past the bridge's vocabulary have no links, so any
        # row will do there.
        delta = delta - self.table[hard.clamp(min=0, max=vocab_size - 1)]
        links = alignment.batch_index.to(device)
        source = links * positions + alignment.lm_position.to(device)
        target = links * clip_positions + alignment.clip_position.to(device)
        weighted = delta.reshape(batch * positions, -1)[source] * alignment.weight.to(device, dtype)[:, None]
        soft = delta.new_zeros((batch * clip_positions, delta.shape[-1])).index_add(0, target, weighted)

        input_ids = alignment.input_ids.to(device)
        attention_mask = alignment.attention_mask.to(device)
        text_model = model.text_model
        inputs_embeds = text_model.embeddings.token_embedding(input_ids) + soft.view(
            batch, clip_positions, -1
        )
        hidden = text_model.embeddings(inputs_embeds=inputs_embeds)
        mask = causal_mask(text_model.config, hidden, attention_mask)
        hidden = text_model.encoder(
            inputs_embeds=hidden, attention_mask=mask, is_causal=True
        ).last_hidden_state
        hidden = text_model.final_layer_norm(hidden)
        pooled = hidden[torch.arange(batch, device=device), alignment.eot_positions.to(device)]
        return model.text_projection(pooled).float()

    forward = encode
