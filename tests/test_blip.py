"""BLIP behind the captioner interface, checked against ``transformers``' own BLIP on a tiny random model.

The tiny checkpoint is a ``BlipForConditionalGeneration`` built from a config, with a BERT WordPiece
tokenizer over the synthetic world's caption words and BLIP's special tokens ([DEC] as bos, [SEP], [PAD]
= 0), saved with ``save_pretrained``: it loads through the same path as ``Salesforce/blip-image-captioning-
base``. References: ``BlipImageProcessorPil`` (BLIP's preprocessing without torchvision), the model's own
``vision_model``, ``forward`` (logits and loss) and ``generate``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from tokenizers.pre_tokenizers import BertPreTokenizer
from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil

from clipcap.blip import BlipCaptioner, BlipImageEncoder, BlipImagePreprocessor, BlipTextDecoder
from clipcap.clip.encoder import ClipEncoder
from clipcap.commands.features import main as features_main
from clipcap.data.batch import collate_caption_batch
from clipcap.data.images import load_image
from clipcap.features.encoders import load_image_encoder
from clipcap.generation import DecodingConfig, cut_at_stop
from clipcap.objectives import CrossEntropy, DiscriTune, GumbelClip
from clipcap.objectives.cross_entropy import token_cross_entropy
from clipcap.synthetic.world import FEATURES_DIR, load_annotations
from clipcap.training import CaptionModule, SyntheticCaptions
from clipcap.training.data import CaptionImages
from reference_images import all_on_white

REPO = Path(__file__).resolve().parents[1]
DT_CONFIG = str(REPO / "lightning_configs" / "synthetic" / "discritune.yaml")
BLIP_CONFIG = REPO / "lightning_configs" / "coco" / "blip_discritune.yaml"
IMAGE_SIZE = 32
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def save_tiny_blip(folder: Path, captions: list[str], seed: int = 0) -> Path:
    """A BLIP captioning checkpoint: 24-wide ViT on 32 px images (16 patches), 32-wide two-layer decoder."""
    words = {word for text in captions for word, _ in BertPreTokenizer().pre_tokenize_str(text.lower())}
    vocab = SPECIAL + sorted(words | {"picture", "of"})
    tokenizer = BertTokenizer(
        vocab={token: i for i, token in enumerate(vocab)},
        do_lower_case=True,
        bos_token="[DEC]",
        additional_special_tokens=["[ENC]"],
    )
    torch.manual_seed(seed)
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            initializer_range=0.2,  # large enough that captions differ from image to image
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.sep_token_id,
            sep_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            image_size=IMAGE_SIZE,
            patch_size=8,
            hidden_size=24,  # ≠ the decoder's width: the cross-attention maps 24 → 32
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            initializer_range=0.2,
        ),
    )
    BlipForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    BlipImagePreprocessor(image_size=IMAGE_SIZE).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def blip_dir(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    captions = [text for record in load_annotations(tiny_world) for text in record.captions]
    return str(save_tiny_blip(tmp_path_factory.mktemp("blip"), captions))


@pytest.fixture(scope="module")
def reference(blip_dir: str) -> BlipForConditionalGeneration:
    return BlipForConditionalGeneration.from_pretrained(blip_dir).eval()


@pytest.fixture(scope="module")
def encoder(blip_dir: str) -> BlipImageEncoder:
    return BlipImageEncoder(blip_dir)


def blip_captioner(blip_dir: str, prompt: str = "", trainable: bool = True) -> BlipCaptioner:
    return BlipCaptioner(BlipTextDecoder(blip_dir, trainable=trainable), prompt=prompt, max_caption_tokens=16)


def sample_images() -> list[Image.Image]:
    torch.manual_seed(0)
    noise = (torch.rand(37, 53, 3) * 255).to(torch.uint8).numpy()
    rgb = Image.fromarray(noise)
    return [
        rgb,  # not square: BLIP squashes it, no crop
        rgb.convert("RGBA").rotate(30, expand=True),  # transparent corners, composited onto white
        rgb.convert("L"),
        rgb.convert("P"),
        rgb.resize((5, 1)),
        rgb.resize((IMAGE_SIZE, IMAGE_SIZE)),  # already the right size: no resize
    ]


@pytest.mark.parametrize("size", [IMAGE_SIZE, 48, 384])
def test_preprocessing_matches_blip_image_processor(size: int) -> None:
    images = sample_images()
    expected = BlipImageProcessorPil(size={"height": size, "width": size})(
        images=all_on_white(images), return_tensors="pt"
    )
    ours = BlipImagePreprocessor(image_size=size)(images)
    assert ours.shape == (len(images), 3, size, size) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected["pixel_values"], rtol=0, atol=0)


def test_preprocessing_config_round_trip(tmp_path: Path) -> None:
    BlipImageProcessorPil(size={"height": 40, "width": 40}, image_mean=[0.5, 0.4, 0.3]).save_pretrained(
        tmp_path
    )
    ours = BlipImagePreprocessor.from_pretrained(tmp_path)
    assert ours == BlipImagePreprocessor(image_size=40, mean=(0.5, 0.4, 0.3))
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    with pytest.raises(ValueError, match="square"):
        BlipImagePreprocessor.from_config_dict({**config, "size": {"shortest_edge": 40}})
    assert ours.to_dict() != BlipImagePreprocessor(image_size=41).to_dict()
    assert ours.resized_pixels(5, 20000) == 40 * 40  # a strip is squashed, never blown up


def test_the_feature_encoder_is_blips_vision_model(
    blip_dir: str, reference, encoder, tiny_world: Path
) -> None:
    images = sample_images()
    pixels = encoder.preprocess(images)
    processor = BlipImageProcessorPil.from_pretrained(blip_dir)  # what the checkpoint's processor does
    torch.testing.assert_close(
        pixels, processor(images=all_on_white(images), return_tensors="pt")["pixel_values"]
    )
    pooled, grid = encoder.encode_images_and_grid(pixels)
    with torch.no_grad():
        expected = reference.vision_model(pixel_values=pixels).last_hidden_state
    assert grid.shape == (len(images), encoder.grid_size, encoder.dim) == (len(images), 17, 24)
    torch.testing.assert_close(grid, expected)
    torch.testing.assert_close(pooled, expected[:, 0])  # the [CLS] row, as the decoder sees it
    assert not any(p.requires_grad for p in encoder.parameters())
    fingerprint = encoder.fingerprint()
    assert fingerprint["model_type"] == "blip" and len(fingerprint["vision_weights_sha1"]) == 16
    assert isinstance(load_image_encoder(blip_dir), BlipImageEncoder)
    assert isinstance(load_image_encoder("synthetic:clip"), ClipEncoder)
    with pytest.raises(ValueError, match="not a CLIP"):
        ClipEncoder(blip_dir)


@pytest.mark.parametrize("prompt", ["", "a picture of"])
def test_teacher_forcing_equals_blips_own_forward(prompt: str, blip_dir: str, reference, encoder) -> None:
    captioner = blip_captioner(blip_dir, prompt).eval()
    pixels = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    grid = encoder.encode_image_grid(pixels)
    tokens = captioner.encode_captions(["a red circle on the left.", "two shapes!", "a"])
    sep, pad = captioner.lm.eos_token_id, captioner.lm.pad_token_id
    assert tokens.input_ids[2].tolist() == [captioner.tokenizer.convert_tokens_to_ids("a"), sep, *[pad] * 6]
    assert (tokens.labels == -100).equal(tokens.attention_mask == 0)
    ours = captioner(grid, tokens)

    # BLIP's own start: [DEC] (the config's bos), then the prompt as its processor tokenizes it, without
    # the [CLS] and [SEP] around it.
    prompt_ids = captioner.tokenizer(prompt)["input_ids"][1:-1] if prompt else []
    start = torch.tensor([reference.config.text_config.bos_token_id, *prompt_ids]).expand(3, -1)
    assert start.shape[1] == 1 + (3 if prompt else 0)
    input_ids = torch.cat([start, tokens.input_ids], dim=1)
    mask = torch.cat([torch.ones_like(start), tokens.attention_mask], dim=1)
    labels = torch.cat([torch.full_like(start, -100), tokens.labels], dim=1)
    with torch.no_grad():
        output = reference(pixel_values=pixels, input_ids=input_ids, attention_mask=mask, labels=labels)
    # Position Q - 1 + t predicts caption token t.
    expected = output.logits[:, start.shape[1] - 1 : -1]
    torch.testing.assert_close(ours.logits, expected, rtol=1e-4, atol=1e-5)
    loss, _ = token_cross_entropy(ours.logits, ours.labels)
    torch.testing.assert_close(loss, output.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prompt", ["", "a picture of"])
def test_greedy_and_beam_decoding_equal_blips_own_generate(
    prompt: str, blip_dir: str, reference, encoder
) -> None:
    captioner = blip_captioner(blip_dir, prompt)
    pixels = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    grid = encoder.encode_image_grid(pixels)
    tokenizer = captioner.tokenizer
    # BLIP's generate takes the processor's "[CLS] prompt [SEP]", puts [DEC] first and drops the [SEP].
    prompt_ids = torch.tensor(tokenizer(prompt)["input_ids"]).expand(4, -1).clone() if prompt else None
    start = captioner.start_ids.shape[0]
    sep = captioner.lm.eos_token_id
    for beams in (1, 3):
        ours = captioner.generate_ids(grid, DecodingConfig(max_new_tokens=10, num_beams=beams))
        expected = reference.generate(
            pixel_values=pixels, input_ids=prompt_ids, max_new_tokens=10, num_beams=beams, do_sample=False
        )
        assert ours == cut_at_stop(expected[:, start:], sep, [sep])
    assert len({tuple(ids) for ids in ours}) > 1, "the images should not all get one caption"
    assert captioner.training, "decoding must restore the training mode"
    texts = captioner.generate(grid, DecodingConfig(max_new_tokens=10, num_beams=3, num_return_sequences=2))
    assert len(texts) == 4 and all(len(pair) == 2 for pair in texts)


def test_a_period_stops_a_caption(blip_dir: str, encoder) -> None:
    captioner = blip_captioner(blip_dir)
    assert captioner.lm.period_token_ids == [captioner.tokenizer.convert_tokens_to_ids(".")]
    pixels = torch.randn(8, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    grid = encoder.encode_image_grid(pixels)
    free = captioner.generate_ids(grid, DecodingConfig(max_new_tokens=12))
    # The random decoder rarely writes "."; a token it does write mid-caption plays the period here.
    period = free[0][2]
    captioner.lm.__dict__["period_token_ids"] = [period]
    stopped = captioner.generate_ids(grid, DecodingConfig(max_new_tokens=12, stop_at_period=True))
    for long, short in zip(free, stopped, strict=True):
        cut = long.index(period) + 1 if period in long else len(long)
        assert short == long[:cut]  # kept through its first period, which stays in the caption
    assert stopped[0] == free[0][: free[0].index(period) + 1] and len(stopped[0]) < len(free[0])


def test_pooled_or_foreign_features_are_refused(blip_dir: str, tmp_path: Path) -> None:
    captioner = blip_captioner(blip_dir)
    with pytest.raises(ValueError, match="grid_features=true"):
        captioner.generate_ids(torch.randn(2, captioner.clip_dim))
    with pytest.raises(ValueError, match="same BLIP"):
        captioner.generate_ids(torch.randn(2, 17, captioner.clip_dim + 1))
    with pytest.raises(ValueError, match="clip_model"):
        BlipCaptioner(captioner.lm, clip_dim=captioner.clip_dim + 1)
    with pytest.raises(ValueError, match="--grid"):
        features_main(
            ["--config", DT_CONFIG, "--splits", "val", "--no_progress", f"--data.init_args.clip_model={blip_dir}",
             f"--data.init_args.features_dir={tmp_path}"]
        )  # fmt: skip


@pytest.fixture(scope="module")
def blip_data(blip_dir: str, tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> SyntheticCaptions:
    """The tiny world with BLIP vision features (`clipcap features --grid`), served as grids."""
    features = tmp_path_factory.mktemp("blip_features")
    features_main(
        ["--config", DT_CONFIG, "--splits", "train,val", "--grid", "--grid_dtype", "float16", "--no_progress",
         f"--data.init_args.world_dir={tiny_world}", f"--data.init_args.clip_model={blip_dir}",
         f"--data.init_args.features_dir={features}"]
    )  # fmt: skip
    return SyntheticCaptions(
        world_dir=str(tiny_world),
        clip_model=blip_dir,
        features_dir=str(features),
        grid_features=True,
        batch_size=8,
    )


def test_extracted_features_are_the_vision_sequence(blip_data: SyntheticCaptions, encoder) -> None:
    split = blip_data.split("train")
    entry = split.images[0]
    expected = encoder.encode_image_grid(encoder.preprocess([load_image(entry.image, entry.image_id)]))[0]
    cached = torch.from_numpy(split.clip_features(entry.image_id).astype("float32"))
    torch.testing.assert_close(cached, expected, rtol=1e-3, atol=1e-3)  # stored as float16
    assert blip_data.clip_dim == encoder.dim


def receiver_options(tiny_world: Path) -> dict[str, str]:
    """DiscriTune's CLIP for a BLIP captioner: the world's CLIP with the world's own CLIP features."""
    return {"receiver_clip": "synthetic:clip", "receiver_features_dir": str(tiny_world / FEATURES_DIR)}


def fit(module: CaptionModule, datamodule: SyntheticCaptions, steps: int = 3):
    import lightning.pytorch as pl

    trainer = pl.Trainer(
        max_steps=steps,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer


@pytest.mark.parametrize("objective_name", ["CrossEntropy", "DiscriTune"])
def test_objectives_train_blip_and_checkpoints_round_trip(
    objective_name: str, blip_dir: str, blip_data: SyntheticCaptions, tiny_world: Path, tmp_path: Path
) -> None:
    def objective():
        if objective_name == "CrossEntropy":
            return CrossEntropy()
        return DiscriTune(
            rollout=DecodingConfig(max_new_tokens=8, stop_at_period=True), **receiver_options(tiny_world)
        )

    torch.manual_seed(0)
    module = CaptionModule(
        blip_captioner(blip_dir), objective(), optimizer=lambda params: torch.optim.Adam(params, lr=1e-3)
    )
    keys = module.captioner.state_dict()
    assert keys and all(key.startswith("lm.model.") for key in keys), "no vision weights in the captioner"
    before = {key: value.clone() for key, value in keys.items()}
    trainer = fit(module, blip_data)
    metrics = trainer.callback_metrics
    assert trainer.global_step == 3 and torch.isfinite(metrics["train/loss"])
    if objective_name == "DiscriTune":
        assert torch.isfinite(metrics["train/reward"]) and metrics["train/candidates"] == 8
    changed = [
        key for key, value in module.captioner.state_dict().items() if not torch.equal(value, before[key])
    ]
    assert any("crossattention" in key for key in changed) and any(
        "word_embeddings" in key for key in changed
    )

    path = tmp_path / "blip.ckpt"
    trainer.save_checkpoint(path)
    reloaded = CaptionModule.load_from_checkpoint(
        path, captioner=blip_captioner(blip_dir), objective=objective(), weights_only=False
    )
    batch = collate_caption_batch([CaptionImages(blip_data.split("val"))[i] for i in range(4)])
    decoding = DecodingConfig(max_new_tokens=10, num_beams=2)
    assert reloaded.captioner.generate(batch.clip_features, decoding) == module.captioner.generate(
        batch.clip_features, decoding
    )


def test_a_frozen_decoder_is_left_out_of_checkpoints(blip_dir: str) -> None:
    module = CaptionModule(blip_captioner(blip_dir, trainable=False), CrossEntropy())
    assert not any(p.requires_grad for p in module.parameters())
    module.train()
    assert not module.captioner.lm.model.training, "a frozen decoder stays in eval mode"
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["clipcap_frozen_lm"] == blip_dir
    assert not any(key.startswith("captioner.") for key in checkpoint["state_dict"])
    fresh = CaptionModule(blip_captioner(blip_dir, trainable=False), CrossEntropy())
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])  # strict: the decoder came back from `pretrained`


def test_what_blip_cannot_train_is_refused(
    blip_dir: str, blip_data: SyntheticCaptions, tiny_world: Path
) -> None:
    captioner = blip_captioner(blip_dir)
    batch = collate_caption_batch([CaptionImages(blip_data.split("train"))[i] for i in range(4)])
    kl = DiscriTune(kl_coefficient=0.1, **receiver_options(tiny_world))
    kl.setup(blip_data.training_data())
    with pytest.raises(ValueError, match="kl_coefficient"):
        kl(captioner, batch)
    with pytest.raises(ValueError, match="receiver_clip"):  # BLIP's encoder cannot read captions
        DiscriTune().setup(blip_data.training_data())
    with pytest.raises(ValueError, match="GumbelClip trains a ClipCaptioner only"):
        GumbelClip().setup(blip_data.training_data())
    gumbel = GumbelClip()
    gumbel.set_clip(ClipEncoder("synthetic:clip"))
    with pytest.raises(TypeError, match="BlipCaptioner"):
        gumbel(captioner, batch)


def test_the_shipped_blip_config_trains(
    blip_data: SyntheticCaptions, encoder: BlipImageEncoder, tiny_world: Path, tmp_path: Path
) -> None:
    """The shipped config with its data, receiver and scoring CLIP pointed at the tiny world and its BLIP; every
    other option (the decoder named by interpolation of the data's checkpoint, the prompt) as shipped."""
    from clipcap.training.cli import lightning_cli

    config = yaml.safe_load(BLIP_CONFIG.read_text())
    config["data"] = {
        "class_path": "clipcap.training.SyntheticCaptions",
        "init_args": {
            "world_dir": str(tiny_world),
            "clip_model": blip_data.clip_model,
            "features_dir": str(blip_data.features_dir),
            "grid_features": True,
            "batch_size": 8,
        },
    }
    config["model"]["objective"]["init_args"].update(receiver_options(tiny_world))
    path = tmp_path / "blip_discritune.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = lightning_cli(
        ["fit", "--config", str(path), "--trainer.precision=32-true", "--trainer.logger=false",
         "--trainer.enable_progress_bar=false", "--trainer.fast_dev_run=true",
         "--model.decoding.max_new_tokens=8", "--model.objective.init_args.rollout.max_new_tokens=8",
         "--trainer.default_root_dir", str(tmp_path)]
    )  # fmt: skip
    assert cli.trainer.state.finished
    captioner = cli.model.captioner
    assert isinstance(captioner, BlipCaptioner) and captioner.lm.pretrained == blip_data.clip_model
    assert captioner.prompt == "a picture of " and captioner.start_ids.shape == (4,)
    assert torch.isfinite(cli.trainer.callback_metrics["train/reward"])

    # `clipcap caption` on image files: BLIP's ViT (named by the checkpoint's data) encodes them.
    from clipcap.commands.caption import caption_images, checkpoint_test_decoding

    checkpoint = tmp_path / "run.ckpt"
    cli.trainer.save_checkpoint(checkpoint)
    paths = [entry.image for entry in blip_data.split("val").images[:3]]
    overrides = {"num_beams": 1, "max_new_tokens": 8}
    rows = caption_images(str(checkpoint), paths, decoding_overrides=overrides)
    grid = encoder.encode_image_grid(encoder.preprocess([load_image(path, path) for path in paths]))
    # The test decoding the checkpoint recorded, made greedy and short.
    decoding = DecodingConfig(
        **{**checkpoint_test_decoding(torch.load(checkpoint, weights_only=True)), **overrides}
    )
    assert [row["caption"] for row in rows] == [texts[0] for texts in captioner.generate(grid, decoding)]
    with pytest.raises(ValueError, match="clip_score"):
        caption_images(str(checkpoint), paths[:1], clip_score=True)
