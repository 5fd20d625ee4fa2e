"""CLIP tokenizer, preprocessing and encoder, checked against independent references.

References: openai's ``SimpleTokenizer`` (loaded by file path, since ``import clip`` fails here),
``transformers.CLIPImageProcessorPil`` and a freshly loaded ``CLIPModel`` computed by hand.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from clipcap.clip import (
    ClipEncoder,
    ClipImagePreprocessor,
    clean_caption_text,
    load_clip_tokenizer,
    openai_bpe_path,
)
from reference_images import all_on_white

TRICKY_TEXTS = [
    "A photo of a cat.",
    "Hello World!!",
    "!",
    "!!! ?! ...",
    "Tom &amp; Jerry &lt;3",
    "double escaped &amp;amp; and &amp;quot;quoted&amp;quot;",
    "<i>Tom &amp;amp; Jerry</i> &lt;3",  # looks like HTML, so ftfy leaves entities to html.unescape
    "mojibake: cafÃ© Ã©tÃ©",
    "‘curly’ “quotes” — dashes",
    "I'M YOU'LL we'd it's ''s",
    "3.14159 and 1,000,000 and 2023",
    "UPPER case MiXeD",
    "multiple   spaces\tand\nnewlines  ",
    "non-breaking\u00a0space\u2003em space",
    "İstanbul ΟΔΟΣ straße",
    "日本語のテキスト",
    "emoji 😀👍🏽",
    "ﬁne ligature Ａ fullwidth",
    "e\u0301 combining accent",
    "file separator\x1cbetween",
    "a<|endoftext|>b",
    "",
    "   ",
]


@pytest.fixture(scope="module")
def openai_tokenizer_module() -> ModuleType:
    """openai's ``clip/simple_tokenizer.py``, imported by path (it needs only ftfy and regex)."""
    path = openai_bpe_path().parent / "simple_tokenizer.py"
    spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def openai_tokenizer(openai_tokenizer_module: ModuleType):
    return openai_tokenizer_module.SimpleTokenizer(str(openai_bpe_path()))


def openai_tokenize(openai_tokenizer, texts: list[str], context_length: int, truncate: bool) -> torch.Tensor:
    """``clip.tokenize`` from openai's clip/clip.py (copied: that module cannot be imported here)."""
    sot = openai_tokenizer.encoder["<|startoftext|>"]
    eot = openai_tokenizer.encoder["<|endoftext|>"]
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        tokens = [sot] + openai_tokenizer.encode(text) + [eot]
        if len(tokens) > context_length:
            if not truncate:
                raise RuntimeError(f"Input {text} is too long for context length {context_length}")
            tokens = tokens[:context_length]
            tokens[-1] = eot
        result[i, : len(tokens)] = torch.tensor(tokens)
    return result


# --------------------------------------------------------------------------------------- tokenizer


def test_vocabulary_equals_openai(openai_tokenizer) -> None:
    tokenizer = load_clip_tokenizer()
    assert tokenizer.vocab_size == 49408
    assert tokenizer.hf_tokenizer.get_vocab() == openai_tokenizer.encoder
    assert tokenizer.sot_token_id == openai_tokenizer.encoder["<|startoftext|>"] == 49406
    assert tokenizer.eot_token_id == openai_tokenizer.encoder["<|endoftext|>"] == 49407
    assert load_clip_tokenizer() is tokenizer  # built once


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_encode_and_clean_match_openai(openai_tokenizer, openai_tokenizer_module, text: str) -> None:
    tokenizer = load_clip_tokenizer()
    assert tokenizer.encode(text) == openai_tokenizer.encode(text)
    expected_clean = openai_tokenizer_module.whitespace_clean(
        openai_tokenizer_module.basic_clean(text)
    ).lower()
    assert clean_caption_text(text) == expected_clean


def test_batch_matches_clip_tokenize_padded_to_longest(openai_tokenizer) -> None:
    tokenizer = load_clip_tokenizer()
    batch = tokenizer(TRICKY_TEXTS)
    reference = openai_tokenize(openai_tokenizer, TRICKY_TEXTS, context_length=77, truncate=True)
    length = batch["input_ids"].shape[1]
    longest = max(len(openai_tokenizer.encode(text)) + 2 for text in TRICKY_TEXTS)
    assert length == longest < 77  # padded to the longest row, not to 77
    torch.testing.assert_close(batch["input_ids"], reference[:, :length], rtol=0, atol=0)
    assert batch["input_ids"].dtype == torch.long
    for row, eot in enumerate(batch["eot_positions"].tolist()):
        assert batch["input_ids"][row, 0] == tokenizer.sot_token_id
        assert batch["input_ids"][row, eot] == tokenizer.eot_token_id
        assert batch["attention_mask"][row].tolist() == [1] * (eot + 1) + [0] * (length - eot - 1)


@pytest.mark.parametrize("context_length", [77, 8, 3])
def test_truncation_matches_clip_tokenize(openai_tokenizer, context_length: int) -> None:
    tokenizer = load_clip_tokenizer()
    texts = ["short", " ".join(f"word{i}" for i in range(60)), "a photo of a very red and round apple"]
    batch = tokenizer(texts, context_length=context_length, truncate=True)
    reference = openai_tokenize(openai_tokenizer, texts, context_length=context_length, truncate=True)
    assert batch["input_ids"].shape[1] == context_length  # the long text fills the context
    torch.testing.assert_close(batch["input_ids"], reference, rtol=0, atol=0)
    assert batch["eot_positions"][1] == context_length - 1
    with pytest.raises(ValueError, match="context length"):
        tokenizer(texts, context_length=context_length, truncate=False)


def test_decode_matches_openai(openai_tokenizer) -> None:
    tokenizer = load_clip_tokenizer()
    for text in ["a photo of a cat.", "Tom &amp; Jerry!!", "3 red circles, 2 blue squares"]:
        ids = openai_tokenizer.encode(text)
        assert tokenizer.decode(ids) == openai_tokenizer.decode(ids).strip()
    batch = tokenizer(["a dog", "a much longer caption about a dog"])
    # Row 0 is padded with id 0 (the token "!"); decoding must stop at EOT.
    assert tokenizer.decode(batch["input_ids"][0]) == "a dog"


def test_saved_hf_tokenizer_reloads(tmp_path: Path) -> None:
    tokenizer = load_clip_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    text = clean_caption_text("A Photo of TWO dogs &amp; a cat!")
    assert reloaded(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)


# ------------------------------------------------------------------------------------ preprocessing


def _test_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)

    def noise(width: int, height: int, channels: int) -> np.ndarray:
        return rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)

    palette = Image.fromarray(noise(50, 40, 3)).convert("P")
    palette.info["transparency"] = 0
    return [
        Image.fromarray(noise(37, 91, 3)),  # portrait
        Image.fromarray(noise(640, 427, 3)),  # landscape, long side truncated by the resize rule
        Image.fromarray(noise(300, 300, 3)),  # square
        Image.fromarray(noise(20, 13, 3)),  # smaller than every crop: upsampled
        Image.fromarray(noise(65, 33, 4), mode="RGBA"),  # transparency composited on white
        Image.fromarray(noise(81, 120, 1)[:, :, 0], mode="L"),  # grayscale
        palette,  # palette with a transparent index
    ]


@pytest.mark.parametrize(("shortest_edge", "crop"), [(224, 224), (48, 48), (64, 48), (32, 48)])
def test_preprocess_matches_clip_image_processor(shortest_edge: int, crop: int) -> None:
    images = _test_images()
    reference_processor = CLIPImageProcessorPil(
        size={"shortest_edge": shortest_edge}, crop_size={"height": crop, "width": crop}
    )
    reference = reference_processor(images=all_on_white(images), return_tensors="pt")["pixel_values"]
    ours = ClipImagePreprocessor(image_size=crop, resize_shortest_edge=shortest_edge)(images)
    assert ours.shape == (len(images), 3, crop, crop)
    assert ours.dtype == torch.float32
    # Same PIL resize and the same float64-then-float32 arithmetic: the pixels agree exactly.
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_preprocess_config_round_trip(tmp_path: Path) -> None:
    hf_folder = tmp_path / "hf"
    CLIPImageProcessorPil(
        size={"shortest_edge": 40},
        crop_size={"height": 36, "width": 36},
        image_mean=[0.5, 0.4, 0.3],
        image_std=[0.2, 0.25, 0.3],
    ).save_pretrained(hf_folder)
    ours = ClipImagePreprocessor.from_pretrained(hf_folder)
    assert ours == ClipImagePreprocessor(
        image_size=36, resize_shortest_edge=40, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)
    )
    # ... and what we save, transformers reads back to the same processing.
    ours.save_pretrained(tmp_path / "ours")
    reloaded = CLIPImageProcessorPil.from_pretrained(tmp_path / "ours")
    images = _test_images()[:3]
    torch.testing.assert_close(
        ours(images), reloaded(images=images, return_tensors="pt")["pixel_values"], rtol=0, atol=0
    )
    assert ClipImagePreprocessor(**json.loads(json.dumps(ours.to_dict()))) == ours


def test_preprocess_defaults_without_config(tmp_path: Path) -> None:
    assert ClipImagePreprocessor.from_pretrained(tmp_path) == ClipImagePreprocessor()
    assert ClipImagePreprocessor.from_pretrained(tmp_path, default_image_size=336).image_size == 336


# ------------------------------------------------------------------------------------------ encoder


def tiny_clip_config() -> CLIPConfig:
    return CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
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


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(tiny_clip_config()).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return folder


@pytest.fixture(scope="module")
def encoder(tiny_clip_folder: Path) -> ClipEncoder:
    return ClipEncoder(str(tiny_clip_folder))


@pytest.fixture(scope="module")
def reference_model(tiny_clip_folder: Path) -> CLIPModel:
    return CLIPModel.from_pretrained(tiny_clip_folder).eval()


def test_encoder_is_frozen_and_stays_in_eval(encoder: ClipEncoder) -> None:
    assert not any(parameter.requires_grad for parameter in encoder.parameters())
    parent = torch.nn.Sequential(encoder)
    parent.train()
    assert not encoder.training and not encoder.model.training
    assert not any(module.training for module in encoder.modules())


def test_encoder_properties(encoder: ClipEncoder, tiny_clip_folder: Path) -> None:
    assert encoder.dim == 16
    assert encoder.name == str(tiny_clip_folder)
    assert math.isclose(
        encoder.logit_scale, math.exp(tiny_clip_config().logit_scale_init_value), rel_tol=1e-6
    )
    assert encoder.preprocess == ClipImagePreprocessor(image_size=32, resize_shortest_edge=32)


def test_encode_images_and_pil_match_transformers(encoder: ClipEncoder, reference_model: CLIPModel) -> None:
    images = _test_images()
    pixels = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})(
        images=all_on_white(images), return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        expected = reference_model.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(encoder.encode_images(pixels), expected)
    embeddings = encoder.encode_pil(images)
    assert embeddings.shape == (len(images), 16) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings, expected)


def _manual_text_embeddings(model: CLIPModel, openai_tokenizer, texts: list[str]) -> torch.Tensor:
    """Text embeddings computed one caption at a time, unpadded, pooled at the last (EOT) token."""
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = openai_tokenize(openai_tokenizer, [text], context_length=77, truncate=True)[0]
            ids = ids[: int((ids == 49407).nonzero()[0]) + 1][None]
            hidden = model.text_model(input_ids=ids).last_hidden_state
            rows.append(model.text_projection(hidden[0, -1]))
    return torch.stack(rows)


def test_encode_text_pools_at_eot(encoder: ClipEncoder, reference_model: CLIPModel, openai_tokenizer) -> None:
    texts = ["a cat", "A much LONGER caption about two dogs &amp; a ball!!", "", "word " * 100]
    expected = _manual_text_embeddings(reference_model, openai_tokenizer, texts)
    ours = encoder.encode_text(texts)
    assert ours.shape == (4, 16) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # transformers' own pooling agrees while config.eos_token_id is right ...
    batch = encoder.tokenizer(texts)
    with torch.no_grad():
        hf = reference_model.get_text_features(batch["input_ids"], batch["attention_mask"]).pooler_output
    torch.testing.assert_close(hf, expected, rtol=1e-5, atol=1e-5)


def test_encode_text_ignores_a_wrong_eos_token_id(encoder: ClipEncoder, openai_tokenizer) -> None:
    expected = _manual_text_embeddings(encoder.model, openai_tokenizer, ["a red square", "two circles"])
    original = encoder.model.text_model.eos_token_id
    encoder.model.text_model.eos_token_id = 320  # the id of "a</w>": transformers would pool there
    try:
        torch.testing.assert_close(encoder.encode_text(["a red square", "two circles"]), expected)
    finally:
        encoder.model.text_model.eos_token_id = original


def test_fingerprint_identifies_weights(encoder: ClipEncoder, tiny_clip_folder: Path) -> None:
    fingerprint = encoder.fingerprint()
    assert json.loads(json.dumps(fingerprint)) == fingerprint
    assert fingerprint["path"] == str(tiny_clip_folder)
    assert (fingerprint["projection_dim"], fingerprint["image_size"], fingerprint["patch_size"]) == (
        16,
        32,
        8,
    )
    assert ClipEncoder(str(tiny_clip_folder)).fingerprint() == fingerprint  # stable across loads
    torch.manual_seed(1)
    other = ClipEncoder.from_model(CLIPModel(tiny_clip_config())).fingerprint()  # same config, new weights
    assert other["vision_weights_sha1"] != fingerprint["vision_weights_sha1"]
    assert {k: v for k, v in other.items() if k not in ("vision_weights_sha1", "name", "path")} == {
        k: v for k, v in fingerprint.items() if k not in ("vision_weights_sha1", "name", "path")
    }


def test_from_model_checks_preprocessing_size() -> None:
    model = CLIPModel(tiny_clip_config())
    assert ClipEncoder.from_model(model).preprocess.image_size == 32
    with pytest.raises(ValueError, match="crops to 224"):
        ClipEncoder.from_model(model, preprocess=ClipImagePreprocessor())
