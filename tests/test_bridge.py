"""The LM -> CLIP vocabulary bridge and the differentiable CLIP text path built on it.

References: CLIP's own token embeddings (bridge rows), ``ClipEncoder.encode_text`` of the decoded caption
(soft-path features) and the LM tokenizer's ``decode`` (caption text).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import clipcap.clip.bridge as bridge_module
from clipcap.clip import (
    BYTE_LEVEL,
    METASPACE,
    ClipEncoder,
    SoftClipText,
    VocabularyBridge,
    load_clip_tokenizer,
    load_vocabulary_bridge,
)
from tiny_models import CORPUS, save_tiny_gpt2, tiny_clip_model

LONG_CAPTION = "a large green triangle at the top, next to a yellow star. " * 7  # 98 CLIP tokens
CAPTIONS = [
    "a red circle on the left.",
    "Look, a purple  butterfly!",  # upper case, a double space, words split over many LM tokens
    "emoji 😀 ok",  # one character over several byte-level tokens
    "Tom &amp; Jerry ‘quoted’",  # cleaning changes characters: the coarse alignment path
    LONG_CAPTION,  # far past 77 CLIP tokens
    "",
]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def gpt2_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    folder = save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))
    return AutoTokenizer.from_pretrained(folder)


def sentencepiece_tokenizer(llama_style: bool) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE (``▁`` word starts, ``<unk>``/``<s>``/``</s>``).

    ``llama_style`` adds the 256 ``<0xNN>`` byte-fallback tokens and LLaMA's decoder (Replace ``▁``,
    ByteFallback, Fuse, Strip); otherwise the decoder is ``Metaspace`` and there is no byte fallback.
    """
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    raw.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"])
    )
    if llama_style:
        spec = json.loads(raw.to_str())
        vocab = spec["model"]["vocab"]
        for byte in range(256):
            vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
        spec["model"]["byte_fallback"] = True
        raw = Tokenizer.from_str(json.dumps(spec))
        raw.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:
        raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def llama_tokenizer() -> PreTrainedTokenizerFast:
    return sentencepiece_tokenizer(llama_style=True)


@pytest.fixture(scope="module")
def clip_encoder() -> ClipEncoder:
    return ClipEncoder.from_model(tiny_clip_model(seed=0), name="tiny")


@pytest.fixture(scope="module")
def clip_embedding(clip_encoder: ClipEncoder) -> torch.Tensor:
    return clip_encoder.model.text_model.embeddings.token_embedding.weight.detach()


def clip_id(token: str) -> int:
    return load_clip_tokenizer().hf_tokenizer.convert_tokens_to_ids(token)


def batch_of(
    tokenizer: PreTrainedTokenizerFast, captions: list[str], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) token ids with the stop (EOS) then padding after each caption, and (B,) lengths."""
    rows = [tokenizer.encode(caption, add_special_tokens=False) for caption in captions]
    width = max(len(row) for row in rows) + 1
    token_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for index, row in enumerate(rows):
        token_ids[index, : len(row) + 1] = torch.tensor([*row, tokenizer.eos_token_id])
    return token_ids, torch.tensor([len(row) for row in rows])


def straight_through(
    token_ids: torch.Tensor, vocab_size: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (leaf, requires grad) and straight-through one-hots ``onehot + p - p.detach()`` (B, L, V)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn((*token_ids.shape, vocab_size), generator=generator).requires_grad_()
    p = logits.softmax(-1)
    return logits, torch.nn.functional.one_hot(token_ids, vocab_size).float() + p - p.detach()


# ------------------------------------------------------------------------------------------ the bridge


def byte_level_vocab_tokenizer(tokens: list[str]) -> PreTrainedTokenizerFast:
    """A GPT-2-style tokenizer over exactly ``tokens`` (plus ``<|endoftext|>`` last)."""
    vocab = {token: index for index, token in enumerate([*tokens, "<|endoftext|>"])}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>")


def test_byte_level_rows_follow_clip_embeddings(clip_embedding: torch.Tensor) -> None:
    tokens = ["Ġred", "red", "ĠRed", "Ġred.", "ing", "Ġ", "ð", "Ġcat"]
    tokenizer = byte_level_vocab_tokenizer(tokens)
    bridge = VocabularyBridge.build(tokenizer)
    index = {token: i for i, token in enumerate(tokens)}
    eos = tokenizer.eos_token_id
    assert bridge.scheme == BYTE_LEVEL and bridge.vocab_size == len(tokens) + 1

    red, dot, ing, cat = clip_id("red</w>"), clip_id(".</w>"), clip_id("ing</w>"), clip_id("cat</w>")
    assert bridge.token_text(index["Ġred"]) == " red"
    assert [bridge.clip_ids(index[t]) for t in ("Ġred", "red", "ĠRed")] == [[red]] * 3
    assert bridge.clip_ids(index["Ġred."]) == [red, dot]
    assert bridge.clip_ids(index["ing"]) == [ing]  # a continuation is still tokenized as a whole word
    assert bridge.clip_ids(index["Ġ"]) == [] and bridge.clip_ids(index["ð"]) == []  # space, half a character
    assert bridge.clip_ids(eos) == [] and bridge.is_special[eos] and bridge.token_bytes(eos) == b""
    starts = {t: bool(bridge.starts_word[index[t]]) for t in tokens}
    assert starts == {
        "Ġred": True,
        "red": False,
        "ĠRed": True,
        "Ġred.": True,
        "ing": False,
        "Ġ": True,
        "ð": False,
        "Ġcat": True,
    }

    table = bridge.embedding_table(clip_embedding)
    assert table.shape == (bridge.vocab_size, clip_embedding.shape[1])
    assert torch.equal(table[index["Ġred"]], clip_embedding[red])  # one to one: CLIP's row, bit for bit
    assert torch.equal(table[index["Ġcat"]], clip_embedding[cat])
    assert torch.equal(table[index["ing"]], clip_embedding[ing])
    torch.testing.assert_close(table[index["Ġred."]], (clip_embedding[red] + clip_embedding[dot]) / 2)
    for nothing in (eos, index["Ġ"], index["ð"]):
        assert not table[nothing].any()


def test_byte_level_word_starts_on_a_trained_tokenizer(gpt2_tokenizer: PreTrainedTokenizerFast) -> None:
    bridge = VocabularyBridge.build(gpt2_tokenizer)
    vocab = gpt2_tokenizer.get_vocab()
    assert bridge.scheme == BYTE_LEVEL
    for token, token_id in vocab.items():
        if token_id in gpt2_tokenizer.all_special_ids:
            continue
        # `Ġ` is the space; `ĉ`, `Ċ`, `ğ`... are other whitespace bytes (tab, newline, \x1f), also word starts.
        assert bool(bridge.starts_word[token_id]) == bridge.token_text(token_id)[:1].isspace(), token
        if token[0] == "Ġ" or token[0].isascii():
            assert bool(bridge.starts_word[token_id]) == token.startswith("Ġ"), token
    assert bridge.starts_word[vocab["Ċ"]] and bridge.token_text(vocab["Ċ"]) == "\n"
    assert bridge.clip_ids(vocab["Ġcircle"]) == [clip_id("circle</w>")]
    assert bridge.clip_ids(vocab["le"]) == [clip_id("le</w>")]


@pytest.mark.parametrize("llama_style", [True, False], ids=["llama-decoder", "metaspace-decoder"])
def test_sentencepiece_word_starts(llama_style: bool) -> None:
    tokenizer = sentencepiece_tokenizer(llama_style)
    bridge = VocabularyBridge.build(tokenizer)
    vocab = tokenizer.get_vocab()
    assert bridge.scheme == METASPACE
    assert bridge.token_text(vocab["▁red"]) == " red" and bridge.starts_word[vocab["▁red"]]
    assert bridge.clip_ids(vocab["▁red"]) == [clip_id("red</w>")]
    assert bridge.token_text(vocab["▁"]) == " " and bridge.clip_ids(vocab["▁"]) == []
    for token, token_id in vocab.items():
        if token_id in tokenizer.all_special_ids:
            assert bridge.is_special[token_id] and bridge.clip_ids(token_id) == []
        elif not token.startswith("<0x"):
            assert bool(bridge.starts_word[token_id]) == token.startswith("▁"), token
            assert bridge.token_text(token_id) == token.replace("▁", " ")
    if llama_style:  # byte fallback: <0xNN> is that byte
        assert bridge.token_bytes(vocab["<0x7A>"]) == b"z" and bridge.clip_ids(vocab["<0x7A>"]) == [
            clip_id("z</w>")
        ]
        assert bridge.token_bytes(vocab["<0xF0>"]) == b"\xf0" and bridge.clip_ids(vocab["<0xF0>"]) == []


def test_byte_fallback_runs_decode_as_the_tokenizer_decodes_them(
    llama_tokenizer: PreTrainedTokenizerFast,
) -> None:
    """A run of <0xNN> tokens that is not valid UTF-8 becomes one U+FFFD per byte in the tokenizer's
    decode (tokenizers' ByteFallback), not one per invalid stretch as a plain UTF-8 decode gives."""
    bridge = VocabularyBridge.build(llama_tokenizer)
    vocab = llama_tokenizer.get_vocab()
    example = [vocab[token] for token in ["▁a", "<0xE2>", "<0x82>", "a"]]
    expected = llama_tokenizer.decode(example, skip_special_tokens=True).strip()
    assert expected == "a\ufffd\ufffda"
    assert bridge.decode(example) == expected
    text, owners = bridge_module.decode_with_owners(bridge, example)
    assert owners == [[0], [0], [1], [2], [3]]  # " a" from token 0, one U+FFFD per byte, "a"
    # Random captions mixing words, valid and invalid byte runs and special tokens.
    rng = np.random.default_rng(0)
    words = [vocab[token] for token in vocab if token.startswith("▁") or token.isalpha()][:40]
    bytes_ = [
        vocab[f"<0x{byte:02X}>"] for byte in (0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x98, 0x80, 0x7A)
    ]
    special = [llama_tokenizer.bos_token_id, llama_tokenizer.eos_token_id]
    for _ in range(300):
        pool = rng.choice(3, size=int(rng.integers(1, 12)), p=[0.4, 0.5, 0.1])
        ids = [int(rng.choice([words, bytes_, special][kind])) for kind in pool]
        assert bridge.decode(ids) == llama_tokenizer.decode(ids, skip_special_tokens=True).strip(), ids


# ------------------------------------------------------------------------------------------ the soft path


def check_matches_encode_text(
    soft: SoftClipText, tokenizer: PreTrainedTokenizerFast, captions: list[str], pad_id: int
) -> None:
    token_ids, lengths = batch_of(tokenizer, captions, pad_id)
    _, y = straight_through(token_ids, len(tokenizer))
    texts = soft.captions(token_ids, lengths)
    decoded = [
        tokenizer.decode(row[:n], skip_special_tokens=True).strip()
        for row, n in zip(token_ids.tolist(), lengths.tolist(), strict=True)
    ]
    assert texts == decoded
    assert texts[-1] == ""
    assert (
        int(soft.align(token_ids, lengths).eot_positions.max()) == soft.clip.context_length - 1
    )  # truncated
    features = soft.encode(y, token_ids, lengths)
    assert features.shape == (len(captions), soft.clip.dim) and features.dtype == torch.float32
    torch.testing.assert_close(features, soft.clip.encode_text(texts), atol=1e-5, rtol=0)


def test_hard_features_equal_encode_text_gpt2(
    gpt2_tokenizer: PreTrainedTokenizerFast, clip_encoder: ClipEncoder
) -> None:
    soft = SoftClipText(clip_encoder, VocabularyBridge.build(gpt2_tokenizer))
    check_matches_encode_text(soft, gpt2_tokenizer, CAPTIONS, pad_id=gpt2_tokenizer.eos_token_id)


def test_hard_features_equal_encode_text_sentencepiece(
    llama_tokenizer: PreTrainedTokenizerFast, clip_encoder: ClipEncoder
) -> None:
    soft = SoftClipText(clip_encoder, VocabularyBridge.build(llama_tokenizer))
    captions = [*CAPTIONS[:3], "zebra at the top", LONG_CAPTION, ""]  # unseen letters: byte fallback
    token_ids, _ = batch_of(llama_tokenizer, captions[3:4], 0)
    assert "<0x7A>" in llama_tokenizer.convert_ids_to_tokens(token_ids[0])
    check_matches_encode_text(soft, llama_tokenizer, captions, pad_id=llama_tokenizer.pad_token_id or 0)


def test_alignment_links_clip_tokens_to_lm_tokens(
    gpt2_tokenizer: PreTrainedTokenizerFast, clip_encoder: ClipEncoder
) -> None:
    soft = SoftClipText(clip_encoder, VocabularyBridge.build(gpt2_tokenizer))
    token_ids, lengths = batch_of(gpt2_tokenizer, CAPTIONS, gpt2_tokenizer.eos_token_id)
    alignment = soft.align(token_ids, lengths)
    expected = soft.clip.tokenizer(alignment.texts, context_length=soft.clip.context_length)
    for name in ("input_ids", "attention_mask", "eot_positions"):
        assert torch.equal(getattr(alignment, name), expected[name]), name

    def links(row: int) -> dict[str, list[str]]:
        mask = alignment.batch_index == row
        found: dict[str, list[str]] = {}
        for c, t in zip(
            alignment.clip_position[mask].tolist(), alignment.lm_position[mask].tolist(), strict=True
        ):
            clip_token = soft.clip.tokenizer.hf_tokenizer.convert_ids_to_tokens(
                int(alignment.input_ids[row, c])
            )
            found.setdefault(f"{c}:{clip_token}", []).append(
                gpt2_tokenizer.convert_ids_to_tokens(int(token_ids[row, t]))
            )
        return found

    # "Look, a purple  butterfly!": one CLIP word over several LM tokens, the lone `Ġ`s join the next word.
    row = links(1)
    assert row["1:look</w>"] == ["L", "o", "o", "k"]
    assert "".join(row["4:purple</w>"]) == "Ġpurple" and "".join(row["5:butterfly</w>"]) == "ĠĠbutterfly"
    # "Tom &amp; Jerry": cleaning unescapes "&amp;", whose LM tokens all link to CLIP's "&".
    assert "".join(links(3)["2:&</w>"]) == "Ġ&amp;"
    # Every caption position before the stop is linked; none at or after it.
    for b, n in enumerate(lengths.tolist()):
        linked = set(alignment.lm_position[alignment.batch_index == b].tolist())
        assert max(linked, default=-1) < n
        if b != 4:  # the long caption loses its end to truncation
            assert linked == set(range(n))
    assert int(alignment.eot_positions[4]) == soft.clip.context_length - 1  # truncated, EOT kept
    assert alignment.input_ids[4, -1] == soft.clip.tokenizer.eot_token_id
    assert alignment.input_ids[5, :2].tolist() == [
        soft.clip.tokenizer.sot_token_id,
        soft.clip.tokenizer.eot_token_id,
    ]
    weights = torch.zeros(alignment.input_ids.shape).index_put_(
        (alignment.batch_index, alignment.clip_position), alignment.weight, accumulate=True
    )
    linked_positions = weights > 0
    torch.testing.assert_close(weights[linked_positions], torch.ones(int(linked_positions.sum())))


def test_gradients_reach_y_not_clip(
    gpt2_tokenizer: PreTrainedTokenizerFast, clip_encoder: ClipEncoder
) -> None:
    soft = SoftClipText(clip_encoder, VocabularyBridge.build(gpt2_tokenizer))
    token_ids, lengths = batch_of(gpt2_tokenizer, CAPTIONS[:3], gpt2_tokenizer.eos_token_id)
    logits, y = straight_through(token_ids, len(gpt2_tokenizer))
    image = torch.nn.functional.normalize(torch.randn(3, soft.clip.dim), dim=-1)
    loss = -torch.nn.functional.cosine_similarity(soft.encode(y, token_ids, lengths), image).sum()
    loss.backward()
    grad = logits.grad
    assert grad is not None and torch.isfinite(grad).all()
    per_position = grad.norm(dim=-1)
    for b, n in enumerate(lengths.tolist()):
        assert (per_position[b, :n] > 0).all(), b  # every caption token, lone spaces included
        assert not per_position[b, n:].any()  # the stop and padding are not part of the caption
    assert all(parameter.grad is None for parameter in soft.clip.parameters())
    assert not any(parameter.requires_grad for parameter in soft.clip.parameters())
    assert soft.state_dict() == {} and list(soft.parameters()) == []


def test_soft_y_swaps_one_to_one_tokens(
    gpt2_tokenizer: PreTrainedTokenizerFast, clip_encoder: ClipEncoder
) -> None:
    """A one-hot y on another token than the hard one reads as that token where both are one CLIP token."""
    soft = SoftClipText(clip_encoder, VocabularyBridge.build(gpt2_tokenizer))
    token_ids, lengths = batch_of(gpt2_tokenizer, ["a red circle on the left."], gpt2_tokenizer.eos_token_id)
    vocab = gpt2_tokenizer.get_vocab()
    y = torch.nn.functional.one_hot(token_ids, len(gpt2_tokenizer)).float()
    position = token_ids[0].tolist().index(vocab["Ġcircle"])
    y[0, position] = 0.0
    y[0, position, vocab["Ġsquare"]] = 1.0
    swapped = soft.encode(y, token_ids, lengths)
    torch.testing.assert_close(
        swapped, soft.clip.encode_text(["a red square on the left."]), atol=1e-5, rtol=0
    )
    y[0, position, vocab["Ġsquare"]] = 0.5
    y[0, position, vocab["Ġcircle"]] = 0.5
    assert not torch.allclose(soft.encode(y, token_ids, lengths), swapped, atol=1e-4)


def test_padded_lm_vocabulary_and_bad_inputs(
    gpt2_tokenizer: PreTrainedTokenizerFast, clip_encoder: ClipEncoder
) -> None:
    soft = SoftClipText(clip_encoder, VocabularyBridge.build(gpt2_tokenizer))
    token_ids, lengths = batch_of(gpt2_tokenizer, CAPTIONS[:2], gpt2_tokenizer.eos_token_id)
    vocab_size = len(gpt2_tokenizer)
    # An LM whose embedding matrix is padded past its tokenizer, sampling a padding row mid-caption: that
    # token has no text, the caption reads as without it.
    without = token_ids[0, : int(lengths[0])].tolist()
    del without[2]
    token_ids[0, 2] = vocab_size + 5
    assert soft.captions(token_ids, lengths)[0] == gpt2_tokenizer.decode(without).strip()
    _, y = straight_through(token_ids, vocab_size + 20)
    torch.testing.assert_close(
        soft.encode(y, token_ids, lengths),
        soft.clip.encode_text(soft.captions(token_ids, lengths)),
        atol=1e-5,
        rtol=0,
    )
    with pytest.raises(ValueError, match="vocabulary columns"):
        soft.encode(y[..., : vocab_size - 1], token_ids, lengths)
    with pytest.raises(ValueError, match="lengths must lie in"):
        soft.encode(y, token_ids, lengths + token_ids.shape[1])
    with pytest.raises(ValueError, match="must be \\(B, L, V\\)"):
        soft.encode(y[:1], token_ids, lengths)
    token_ids[1, 0] = -1
    with pytest.raises(ValueError, match="non-negative"):
        soft.encode(y, token_ids, lengths)


def test_synthetic_world_wiring(tiny_world: Path, tmp_path: Path) -> None:
    from clipcap.lm import PrefixLM

    lm = PrefixLM("synthetic:lm")
    clip = ClipEncoder("synthetic:clip")
    soft = SoftClipText.from_lm_tokenizer(clip, lm.tokenizer, cache_dir=tmp_path)
    captions = ["a red circle on the left.", "two shapes on a grey background.", ""]
    token_ids, lengths = batch_of(lm.tokenizer, captions, lm.pad_token_id)
    logits, y = straight_through(token_ids, lm.model.config.vocab_size)
    features = soft.encode(y, token_ids, lengths)
    torch.testing.assert_close(features, clip.encode_text(captions), atol=1e-5, rtol=0)
    features.sum().backward()
    assert logits.grad is not None and logits.grad[0, : int(lengths[0])].abs().sum(-1).min() > 0


# ------------------------------------------------------------------------------------------ caching


@pytest.fixture
def empty_memory_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bridge_module, "_BRIDGES", {})


def test_disk_cache_is_reused_and_keyed(
    gpt2_tokenizer: PreTrainedTokenizerFast,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    empty_memory_cache: None,
) -> None:
    first = load_vocabulary_bridge(gpt2_tokenizer, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.npz"))
    assert [path.name for path in files] == [f"{first.key}.npz"]
    assert load_vocabulary_bridge(gpt2_tokenizer, cache_dir=tmp_path) is first  # in-process cache

    monkeypatch.setattr(bridge_module, "_BRIDGES", {})

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("the bridge was rebuilt instead of read from the cache file")

    monkeypatch.setattr(VocabularyBridge, "_build", no_build)
    second = load_vocabulary_bridge(gpt2_tokenizer, cache_dir=tmp_path)
    assert second is not first and second.key == first.key
    for v in range(first.vocab_size):
        assert second.clip_ids(v) == first.clip_ids(v) and second.token_bytes(v) == first.token_bytes(v)
    assert np.array_equal(second.starts_word, first.starts_word)
    assert np.array_equal(second.is_special, first.is_special)
    monkeypatch.undo()

    monkeypatch.setattr(bridge_module, "_BRIDGES", {})
    other = load_vocabulary_bridge(sentencepiece_tokenizer(llama_style=False), cache_dir=tmp_path)
    assert other.key != first.key
    assert sorted(path.name for path in tmp_path.glob("*.npz")) == sorted(
        [f"{first.key}.npz", f"{other.key}.npz"]
    )


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong-key"])
def test_corrupt_cache_file_is_rebuilt(
    gpt2_tokenizer: PreTrainedTokenizerFast,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    damage: str,
) -> None:
    monkeypatch.setattr(bridge_module, "_BRIDGES", {})
    good = load_vocabulary_bridge(gpt2_tokenizer, cache_dir=tmp_path)
    path = tmp_path / f"{good.key}.npz"
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a zip file at all")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        impostor = VocabularyBridge.build(gpt2_tokenizer)
        impostor.key = "0" * 32
        impostor.save(path)
    monkeypatch.setattr(bridge_module, "_BRIDGES", {})
    with caplog.at_level(logging.WARNING, logger="clipcap.clip.bridge"):
        rebuilt = load_vocabulary_bridge(gpt2_tokenizer, cache_dir=tmp_path)
    assert "rebuilding the vocabulary bridge" in caplog.text
    assert rebuilt.key == good.key
    assert [rebuilt.clip_ids(v) for v in range(rebuilt.vocab_size)] == [
        good.clip_ids(v) for v in range(good.vocab_size)
    ]
    assert VocabularyBridge.load(path, expected_key=good.key).key == good.key  # the file was replaced


def test_moving_the_module_moves_its_clip(gpt2_tokenizer: PreTrainedTokenizerFast) -> None:
    clip = ClipEncoder.from_model(tiny_clip_model(seed=1), name="tiny-1")
    soft = SoftClipText(clip, VocabularyBridge.build(gpt2_tokenizer)).to(torch.float64)
    assert soft.table.dtype == torch.float64 and clip.dtype == torch.float64
    token_ids, lengths = batch_of(gpt2_tokenizer, CAPTIONS[:2], gpt2_tokenizer.eos_token_id)
    _, y = straight_through(token_ids, len(gpt2_tokenizer))
    features = soft.encode(y.double(), token_ids, lengths)
    torch.testing.assert_close(
        features, clip.encode_text(soft.captions(token_ids, lengths)), atol=1e-6, rtol=0
    )
