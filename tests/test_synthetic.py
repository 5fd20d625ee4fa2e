"""Tests of the synthetic world: scene determinism, caption style, the world's layout, models and build."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch

from clipcap.commands import world as world_command
from clipcap.synthetic import scenes, world
from clipcap.synthetic.scenes import (
    KIND_SYNONYMS,
    POSITIONS,
    SIZE_SYNONYMS,
    describe_scene,
    generate_captions,
    generate_scene,
    render_scene,
)
from clipcap.synthetic.world import WorldSpec


def _kinds_named(caption: str) -> set[str]:
    """The shape kinds a caption names, through any of their synonyms."""
    return {kind for kind, words in KIND_SYNONYMS.items() if any(word in caption for word in words)}


def _is_precise(caption: str, scene: scenes.Scene) -> bool:
    """Whether a caption gives the salient object's size, colour and kind."""
    obj = scene.salient
    return (
        any(word in caption.split() for word in SIZE_SYNONYMS[obj.size])
        and obj.colour in caption
        and obj.kind in _kinds_named(caption)
    )


# ------------------------------------------------------------------------------------------------ scenes


def test_scenes_are_deterministic() -> None:
    for index in range(5):
        first, second = generate_scene(7, index), generate_scene(7, index)
        assert first == second
        assert render_scene(first).tobytes() == render_scene(second).tobytes()
        assert generate_captions(first, 7, index) == generate_captions(second, 7, index)


def test_different_seeds_give_different_scenes() -> None:
    seed_a = [describe_scene(generate_scene(0, index)) for index in range(20)]
    seed_b = [describe_scene(generate_scene(1, index)) for index in range(20)]
    assert seed_a != seed_b
    images_a = [render_scene(generate_scene(0, index)).tobytes() for index in range(5)]
    images_b = [render_scene(generate_scene(1, index)).tobytes() for index in range(5)]
    assert all(a != b for a, b in zip(images_a, images_b, strict=True))


def test_scene_stream_does_not_depend_on_the_global_random_state() -> None:
    random.seed(123)
    expected = generate_scene(3, 4)
    random.seed(456)
    assert generate_scene(3, 4) == expected


def test_scene_structure() -> None:
    for index in range(200):
        scene = generate_scene("structure", index)
        assert 1 <= len(scene.objects) <= scenes.MAX_OBJECTS
        cells = [(obj.row, obj.col) for obj in scene.objects]
        assert len(set(cells)) == len(cells), "shapes must not share a grid cell"
        assert all(cell in POSITIONS for cell in cells)
        if any(obj.size == "large" for obj in scene.objects):
            assert scene.salient.size == "large"
        image = render_scene(scene, image_size=64)
        assert image.size == (64, 64) and image.mode == "RGB"


def test_description_names_every_object_and_the_background() -> None:
    for index in range(50):
        scene = generate_scene(2, index)
        description = describe_scene(scene)
        for obj in scene.objects:
            assert f"{obj.size} {obj.colour} {obj.kind} {obj.position}" in description
        assert description.endswith(f"on a {scene.background} background.")


def test_captions_mention_the_salient_object() -> None:
    for index in range(200):
        scene = generate_scene(4, index)
        captions = generate_captions(scene, 4, index)
        naming = [caption for caption in captions if _kinds_named(caption)]
        assert naming, f"no caption names a shape: {captions}"
        for caption in naming:
            assert scene.salient.kind in _kinds_named(caption), (caption, describe_scene(scene))


def test_reference_sets_mix_precise_and_vague_captions() -> None:
    precise_total, vague_total, exclamations = 0, 0, 0
    for index in range(200):
        scene = generate_scene(5, index)
        captions = generate_captions(scene, 5, index)
        assert len(captions) == scenes.CAPTIONS_PER_IMAGE
        assert len(set(captions)) == len(captions)
        for caption in captions:
            assert caption == caption.lower() and caption[-1] in ".!", caption
        precise = [caption for caption in captions if _is_precise(caption, scene)]
        assert precise, f"no precise caption: {captions}"
        assert len(precise) < len(captions), f"no vague caption: {captions}"
        precise_total += len(precise)
        vague_total += len(captions) - len(precise)
        exclamations += sum(caption.endswith("!") for caption in captions)
    assert vague_total > precise_total, "as in human references, most captions should be vague"
    assert exclamations > 0, "some captions must keep '!' so that its tokens are trained on"


def test_scene_golden() -> None:
    # Scenes must be identical on every machine; a change here needs a WORLD_VERSION bump.
    scene = generate_scene("0:train", 11)
    assert describe_scene(scene) == (
        "a large purple square at the top, a large blue square on the right and a large blue star in the "
        "centre, on a grey background."
    )
    assert generate_captions(scene, "0:train", 11) == [
        "a picture with a square and a star.",
        "a few coloured shapes.",
        "three shapes on a grey background.",
        "a big purple square on a grey background.",
        "there is a large purple square at the top.",
    ]


# ------------------------------------------------------------------------------------------ world folder


def test_tiny_world_layout(tiny_world: Path) -> None:
    spec = WorldSpec.tiny()
    info = json.loads((tiny_world / world.WORLD_FILE).read_text())
    assert info["version"] == world.WORLD_VERSION and info["complete"] is True
    assert WorldSpec.from_dict(info["spec"]) == spec
    for key in ("clip_description_r1", "clip_caption_r1", "lm_loss", "lm_val_loss"):
        assert key in info["metrics"]

    records = world.load_annotations(tiny_world)
    assert [sum(r.split == split for r in records) for split in world.SPLITS] == [
        spec.num_train,
        spec.num_val,
        spec.num_test,
    ]
    assert len(world.load_annotations(tiny_world, split="val")) == spec.num_val
    first = records[0]
    assert first.image_id == "train_000001" and first.file_name == "images/train/train_000001.png"
    for record in records:
        assert (tiny_world / record.file_name).is_file()
        assert record.description and len(record.captions) == scenes.CAPTIONS_PER_IMAGE
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"):
        assert (tiny_world / world.CLIP_DIR / name).is_file(), name
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tiny_world / world.LM_DIR / name).is_file(), name
    preprocessor = json.loads((tiny_world / world.CLIP_DIR / "preprocessor_config.json").read_text())
    assert preprocessor["crop_size"] == {"height": spec.clip_image_size, "width": spec.clip_image_size}
    assert preprocessor["resample"] == 3
    assert not list(tiny_world.parent.glob(f".{tiny_world.name}.tmp-*")), "staging folder left behind"


def test_world_clip_loads_and_pools_at_eot(tiny_world: Path) -> None:
    from transformers import CLIPModel

    from clipcap.clip import ClipEncoder

    model = CLIPModel.from_pretrained(tiny_world / world.CLIP_DIR)
    assert model.config.text_config.vocab_size == 49408
    assert model.config.text_config.eos_token_id == 49407
    encoder = ClipEncoder("synthetic:clip")  # resolves through CLIPCAP_WORLD, set by the fixture
    assert encoder.dim == WorldSpec.tiny().clip_projection_dim
    texts = ["a red circle.", "look, a large blue star at the top left!"]
    batch = encoder.tokenizer(texts)
    with torch.no_grad():
        native = model.get_text_features(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).pooler_output
    torch.testing.assert_close(native, encoder.encode_text(texts))


def test_world_lm_loads_with_gpt2_conventions(tiny_world: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_world / world.LM_DIR)
    model = AutoModelForCausalLM.from_pretrained(tiny_world / world.LM_DIR)
    assert tokenizer.pad_token is None
    assert tokenizer.eos_token == tokenizer.bos_token == world.LM_EOS_TOKEN
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.vocab_size == len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a red star!")["input_ids"])
    assert not tokens[0].startswith("Ġ"), "like GPT-2, no prefix space is added"
    assert any(token.startswith("Ġ") for token in tokens[1:])
    assert "!" in tokenizer.decode(tokenizer("look, a red star!")["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokenizer("a red star.")["input_ids"]])).logits
    assert logits.shape[-1] == len(tokenizer)


def test_world_features(tiny_world: Path) -> None:
    from clipcap.clip import ClipEncoder
    from clipcap.features import FeatureCache, cache_expectation

    encoder = ClipEncoder(str(tiny_world / world.CLIP_DIR))
    for split in world.SPLITS:
        records = world.load_annotations(tiny_world, split=split)
        cache = FeatureCache.open(
            tiny_world / world.FEATURES_DIR / split,
            expect=cache_expectation(encoder, dataset=world.DATASET_NAME, split=split),
        )
        assert len(cache) == len(records) and cache.dim == encoder.dim
        assert list(cache.image_ids) == [record.image_id for record in records]


def test_ensure_world_reuses_a_complete_world(tiny_world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("ensure_world rebuilt a complete world")

    monkeypatch.setattr(world, "_build_and_install", no_build)
    mtime = (tiny_world / world.WORLD_FILE).stat().st_mtime_ns
    assert world.ensure_world(tiny_world) == tiny_world
    assert world.ensure_world() == tiny_world  # default location is $CLIPCAP_WORLD
    assert (tiny_world / world.WORLD_FILE).stat().st_mtime_ns == mtime


def test_ensure_world_builds_the_default_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Path, WorldSpec]] = []

    def fake_build(world_dir: Path, spec: WorldSpec, replace: bool) -> None:
        calls.append((world_dir, spec))
        world_dir.mkdir(parents=True)
        info = {"version": world.WORLD_VERSION, "complete": True}
        (world_dir / world.WORLD_FILE).write_text(json.dumps(info))

    monkeypatch.setattr(world, "_build_and_install", fake_build)
    target = tmp_path / "cache" / "world"
    assert world.ensure_world(target) == target
    assert world.ensure_world(target) == target
    assert calls == [(target, WorldSpec.default())]


def test_interrupted_build_leaves_no_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated crash during CLIP training")

    monkeypatch.setattr(world, "train_clip", crash)
    target = tmp_path / "world"
    with pytest.raises(RuntimeError, match="simulated crash"):
        world.build_world(target, WorldSpec.tiny())
    assert not target.exists()
    assert [path.name for path in tmp_path.iterdir()] == [f".{target.name}.lock"]


def test_install_keeps_a_world_another_process_finished(tmp_path: Path) -> None:
    target = tmp_path / "world"
    target.mkdir()
    (target / world.WORLD_FILE).write_text(json.dumps({"version": world.WORLD_VERSION, "complete": True}))
    staging = tmp_path / ".world.tmp-1"
    staging.mkdir()
    (staging / "marker").write_text("ours")
    world._install(staging, target, replace=False)
    assert not (target / "marker").exists()
    world._install(staging, target, replace=True)
    assert (target / "marker").read_text() == "ours"
    assert not (target / world.WORLD_FILE).exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["world"]


def test_default_world_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CLIPCAP_WORLD", str(tmp_path / "explicit"))
    monkeypatch.setenv("CLIPCAP_CACHE", str(tmp_path / "cache"))
    assert world.default_world_dir() == tmp_path / "explicit"
    monkeypatch.delenv("CLIPCAP_WORLD")
    assert world.default_world_dir() == tmp_path / "cache" / world.WORLD_DIR_NAME
    monkeypatch.delenv("CLIPCAP_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert world.default_world_dir() == tmp_path / "home" / ".cache" / "clipcap" / "synthetic-world-v1"


def test_incomplete_or_other_version_world_is_not_complete(tmp_path: Path) -> None:
    assert not world.is_complete_world(tmp_path / "missing")
    (tmp_path / world.WORLD_FILE).write_text("{not json")
    assert not world.is_complete_world(tmp_path)
    (tmp_path / world.WORLD_FILE).write_text(
        json.dumps({"version": world.WORLD_VERSION + 1, "complete": True})
    )
    assert not world.is_complete_world(tmp_path)


def test_leftovers_of_a_killed_build_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_build(world_dir: Path, spec: WorldSpec, replace: bool) -> None:
        world_dir.mkdir()
        (world_dir / world.WORLD_FILE).write_text(
            json.dumps({"version": world.WORLD_VERSION, "complete": True})
        )

    monkeypatch.setattr(world, "_build_and_install", fake_build)
    target = tmp_path / "world"
    (tmp_path / ".world.tmp-99999-deadbeef" / "images").mkdir(parents=True)
    (tmp_path / ".other.tmp-1").mkdir()  # another world's staging folder is not ours to delete
    world.ensure_world(target)
    assert sorted(path.name for path in tmp_path.iterdir()) == [".other.tmp-1", ".world.lock", "world"]


def test_two_concurrent_first_uses_build_the_world_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``clipcap world`` twice at once on an empty folder: one builds, the other says it waits, then finds
    the world complete and leaves it in place (it used to check before locking, then rebuild and replace)."""
    import threading
    import time

    builds: list[Path] = []

    def quick_build(folder: Path, spec: WorldSpec, final_dir: Path) -> None:
        builds.append(folder)
        time.sleep(0.5)
        folder.mkdir()
        info = {"version": world.WORLD_VERSION, "complete": True, "metrics": {}, "builder": len(builds)}
        (folder / world.WORLD_FILE).write_text(json.dumps(info))

    monkeypatch.setattr(world, "_build_into", quick_build)
    target = tmp_path / "world"
    errors: list[BaseException] = []

    def first_use() -> None:
        try:
            world_command.main(["--dir", str(target), "--tiny"])
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    with caplog.at_level(logging.WARNING, logger="clipcap.synthetic.world"):
        threads = [threading.Thread(target=first_use) for _ in range(2)]
        for thread in threads:
            thread.start()
            time.sleep(0.1)
        for thread in threads:
            thread.join()
    assert errors == [] and len(builds) == 1
    assert json.loads((target / world.WORLD_FILE).read_text())["builder"] == 1
    assert any("waiting for another process" in record.getMessage() for record in caplog.records)
