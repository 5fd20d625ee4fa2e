"""Feature cache (round trip, atomic replacement, validation, provenance checks) and feature extraction."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

import clipcap.features.cache as cache_module
from clipcap.clip import ClipEncoder
from clipcap.features import (
    FeatureCache,
    FeatureCacheError,
    FeatureCacheMismatch,
    ImageReadError,
    cache_expectation,
    extract_features,
    load_image,
)
from reference_images import on_white
from tiny_models import tiny_clip_model

META = {
    "clip": {"name": "tiny", "path": "/models/tiny", "projection_dim": 8, "vision_weights_sha1": "abc123"},
    "preprocessing": {"image_size": 32, "resize_shortest_edge": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
    "dataset": "coco",
    "split": "val",
}


def random_features(count: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)


def siblings(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.parent.iterdir())


# ------------------------------------------------------------------------------------------ cache


def test_round_trip(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    features = random_features(5)
    ids = ["b", "a", "img_3", "42", "x y"]
    written = FeatureCache.write(folder, ids, features, META)
    cache = FeatureCache.open(folder)
    for opened in (written, cache):
        assert isinstance(opened.features, np.memmap)
        assert opened.features.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(opened.features), features)
        assert opened.image_ids == ids
        assert len(opened) == 5 and opened.dim == 8
    assert cache.meta == {
        **META,
        "dim": 8,
        "count": 5,
        "format_version": cache_module.FORMAT_VERSION,
        "grid_shape": None,
        "grid_dtype": None,
    }
    assert cache.grid is None
    assert cache.index_of("42") == 3
    np.testing.assert_array_equal(cache.get("a"), features[1])
    assert "x y" in cache and "zzz" not in cache
    with pytest.raises(KeyError, match="zzz"):
        cache.index_of("zzz")
    assert siblings(folder) == ["cache"]  # no staging folder left behind
    # Only plain .npy / JSON: the features load with pickling disabled.
    np.load(folder / "features.npy", allow_pickle=False)


def test_float64_features_are_stored_as_float32(tmp_path: Path) -> None:
    features = random_features(3).astype(np.float64)
    cache = FeatureCache.write(tmp_path / "cache", ["a", "b", "c"], features, META)
    assert cache.features.dtype == np.float32
    np.testing.assert_allclose(cache.features, features, rtol=1e-6)


def test_empty_cache(tmp_path: Path) -> None:
    cache = FeatureCache.write(tmp_path / "cache", [], np.zeros((0, 8), np.float32), META)
    assert len(FeatureCache.open(tmp_path / "cache")) == 0 and cache.dim == 8


@pytest.mark.parametrize(
    ("ids", "features", "error", "match"),
    [
        (["a", "a", "b"], random_features(3), ValueError, "duplicate image ids 'a'"),
        (["a", "b"], random_features(3), ValueError, "2 image ids but 3 feature rows"),
        (["a", 2, "c"], random_features(3), TypeError, "must be strings"),
        (["a", "b", "c"], random_features(3)[:, 0], ValueError, "2-D"),
    ],
)
def test_write_rejects_bad_input(tmp_path: Path, ids, features, error, match) -> None:
    with pytest.raises(error, match=match):
        FeatureCache.write(tmp_path / "cache", ids, features, META)
    assert not (tmp_path / "cache").exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_old_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "cache"
    old = random_features(4, seed=1)
    FeatureCache.write(folder, ["a", "b", "c", "d"], old, META)

    real_write_text = cache_module._write_text

    def fail_on_meta(path: Path, text: str) -> None:
        if path.name == cache_module.META_FILE:  # features.npy and image_ids.json are written by now
            raise OSError("disk full")
        real_write_text(path, text)

    monkeypatch.setattr(cache_module, "_write_text", fail_on_meta)
    with pytest.raises(OSError, match="disk full"):
        FeatureCache.write(folder, ["x", "y"], random_features(2, seed=2), {**META, "split": "test"})

    cache = FeatureCache.open(folder)
    np.testing.assert_array_equal(cache.features, old)
    assert cache.image_ids == ["a", "b", "c", "d"] and cache.meta["split"] == "val"
    assert siblings(folder) == ["cache"]


def test_failed_final_rename_restores_old_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "cache"
    old = random_features(2, seed=1)
    FeatureCache.write(folder, ["a", "b"], old, META)

    real_rename = os.rename

    def fail_when_installing(source, target) -> None:
        if Path(source).name.startswith(".cache.tmp-"):
            raise OSError("rename failed")
        real_rename(source, target)

    monkeypatch.setattr(cache_module.os, "rename", fail_when_installing)
    with pytest.raises(OSError, match="rename failed"):
        FeatureCache.write(folder, ["x"], random_features(1), META)
    monkeypatch.undo()
    np.testing.assert_array_equal(FeatureCache.open(folder).features, old)
    assert siblings(folder) == ["cache"]


def test_successful_rewrite_replaces_cache(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    FeatureCache.write(folder, ["a", "b"], random_features(2, seed=1), META)
    new = random_features(3, seed=2)
    FeatureCache.write(folder, ["x", "y", "z"], new, {**META, "split": "test"})
    cache = FeatureCache.open(folder)
    np.testing.assert_array_equal(cache.features, new)
    assert cache.image_ids == ["x", "y", "z"] and cache.meta["split"] == "test"
    assert siblings(folder) == ["cache"]


def test_write_refuses_to_replace_other_folders(tmp_path: Path) -> None:
    folder = tmp_path / "my_photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="not a feature cache"):
        FeatureCache.write(folder, ["a"], random_features(1), META)
    assert (folder / "holiday.jpg").read_bytes() == b"precious"


def _corrupt(folder: Path, how: str) -> None:
    if how.startswith("missing "):
        (folder / how.removeprefix("missing ")).unlink()
    elif how == "fewer ids":
        (folder / "image_ids.json").write_text(json.dumps(["a", "b"]))
    elif how == "duplicate ids":
        (folder / "image_ids.json").write_text(json.dumps(["a", "b", "a"]))
    elif how == "ids not a list":
        (folder / "image_ids.json").write_text(json.dumps({"a": 0}))
    elif how == "bad json":
        (folder / "meta.json").write_text("{not json")
    elif how == "truncated npy":
        data = (folder / "features.npy").read_bytes()
        (folder / "features.npy").write_bytes(data[: len(data) - 20])
    elif how == "pickled npy":
        np.save(folder / "features.npy", np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)
    elif how == "float64 npy":
        np.save(folder / "features.npy", random_features(3).astype(np.float64))
    elif how == "meta count":
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, "count": 7}))
    elif how == "old format":
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, "format_version": 0}))
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    ("how", "error", "match"),
    [
        ("missing features.npy", FileNotFoundError, "features.npy is missing"),
        ("missing image_ids.json", FileNotFoundError, "image_ids.json is missing"),
        ("missing meta.json", FileNotFoundError, "meta.json is missing"),
        ("fewer ids", FeatureCacheError, "features.npy has 3 rows but image_ids.json has 2 ids"),
        ("duplicate ids", FeatureCacheError, "image_ids.json: duplicate image ids 'a'"),
        ("ids not a list", FeatureCacheError, "image_ids.json: expected a JSON list"),
        ("bad json", FeatureCacheError, "meta.json: not valid JSON"),
        ("truncated npy", FeatureCacheError, "features.npy: not a readable .npy"),
        ("pickled npy", FeatureCacheError, "features.npy: not a readable .npy"),
        ("float64 npy", FeatureCacheError, "features.npy: expected float32"),
        ("meta count", FeatureCacheError, "meta.json: count is 7 but features.npy has 3"),
        ("old format", FeatureCacheError, "format_version is 0"),
    ],
)
def test_open_reports_corruption(tmp_path: Path, how: str, error: type, match: str) -> None:
    folder = tmp_path / "cache"
    FeatureCache.write(folder, ["a", "b", "c"], random_features(3), META)
    _corrupt(folder, how)
    with pytest.raises(error, match=match):
        FeatureCache.open(folder)


def test_open_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FeatureCache.open(tmp_path / "nowhere")


def test_mismatch_is_refused_with_field_and_values(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    FeatureCache.write(folder, ["a"], random_features(1), META)
    expect = {
        "clip": {**META["clip"], "vision_weights_sha1": "def456"},
        "preprocessing": {**META["preprocessing"], "image_size": 224},
        "split": "test",
    }
    with pytest.raises(FeatureCacheMismatch) as raised:
        FeatureCache.open(folder, expect=expect)
    message = str(raised.value)
    assert "clip.vision_weights_sha1: cached 'abc123', expected 'def456'" in message
    assert "preprocessing.image_size: cached 32, expected 224" in message
    assert "split: cached 'val', expected 'test'" in message
    assert "Re-extract" in message
    assert [field for field, _, _ in raised.value.mismatches] == [
        "clip.vision_weights_sha1",
        "preprocessing.image_size",
        "split",
    ]
    assert isinstance(raised.value, ValueError)


def test_matching_expectation_is_accepted(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    FeatureCache.write(folder, ["a"], random_features(1), META)
    FeatureCache.open(folder, expect=META)
    # Where the same weights were loaded from is informational, not a reason to refuse.
    moved = {**META["clip"], "name": "synthetic:clip", "path": "/elsewhere"}
    FeatureCache.open(folder, expect={"clip": moved, "preprocessing": META["preprocessing"], "dataset": None})
    with pytest.raises(FeatureCacheMismatch, match="clip.patch_size: cached <not recorded>, expected 8"):
        FeatureCache.open(folder, expect={"clip": {**META["clip"], "patch_size": 8}})


# ------------------------------------------------------------------------------------- extraction


@pytest.fixture
def image_files(tmp_path: Path) -> tuple[list[Path], list[str]]:
    rng = np.random.default_rng(0)
    shapes = [
        (40, 30, "RGB", "png"),
        (64, 64, "RGB", "jpg"),
        (25, 50, "RGBA", "png"),
        (33, 33, "L", "png"),
        (80, 20, "RGB", "bmp"),
    ]
    paths, ids = [], []
    for index, (width, height, mode, suffix) in enumerate(shapes):
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
        image = Image.fromarray(pixels[:, :, 0] if mode == "L" else pixels, mode=mode)
        path = tmp_path / "images" / f"{index}.{suffix}"
        path.parent.mkdir(exist_ok=True)
        image.save(path)
        paths.append(path)
        ids.append(f"img{index}")
    return paths, ids


def test_extraction_equals_direct_encoding(
    tiny_clip_encoder: ClipEncoder, image_files, tmp_path: Path
) -> None:
    paths, ids = image_files
    cache = extract_features(
        tiny_clip_encoder,
        paths,
        ids,
        tmp_path / "features",
        dataset="toy",
        split="train",
        batch_size=2,
        progress=False,
    )
    # Reference: transformers' own processor and CLIPModel, image by image.
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    with torch.no_grad():
        expected = torch.cat(
            [
                tiny_clip_encoder.model.get_image_features(
                    pixel_values=processor(images=[on_white(Image.open(path))], return_tensors="pt")[
                        "pixel_values"
                    ]
                ).pooler_output
                for path in paths
            ]
        ).numpy()
    assert cache.image_ids == ids
    np.testing.assert_allclose(cache.features, expected, rtol=1e-5, atol=1e-5)
    assert cache.meta["clip"] == tiny_clip_encoder.fingerprint()
    assert cache.meta["preprocessing"] == tiny_clip_encoder.preprocess.to_dict()
    assert (cache.meta["dataset"], cache.meta["split"]) == ("toy", "train")

    reopened = FeatureCache.open(
        tmp_path / "features", expect=cache_expectation(tiny_clip_encoder, "toy", "train")
    )
    np.testing.assert_array_equal(reopened.get("img3"), cache.features[3])
    with pytest.raises(FeatureCacheMismatch, match="split: cached 'train', expected 'val'"):
        FeatureCache.open(tmp_path / "features", expect=cache_expectation(tiny_clip_encoder, "toy", "val"))
    other = ClipEncoder.from_model(tiny_clip_model(seed=1), name="tiny")  # same architecture, other weights
    with pytest.raises(FeatureCacheMismatch, match="clip.vision_weights_sha1"):
        FeatureCache.open(tmp_path / "features", expect=cache_expectation(other))


@pytest.mark.parametrize("problem", ["missing", "corrupt", "truncated"])
def test_unreadable_image_is_named_and_skipped(
    tiny_clip_encoder: ClipEncoder, image_files, tmp_path: Path, problem: str
) -> None:
    paths, ids = image_files
    broken = paths[3]
    if problem == "missing":
        broken.unlink()
    elif problem == "corrupt":
        broken.write_bytes(b"this is not an image")
    else:
        broken.write_bytes(broken.read_bytes()[:60])
    with pytest.raises(ImageReadError) as raised:
        load_image(broken, "img3")
    assert str(broken) in str(raised.value) and "'img3'" in str(raised.value)
    assert raised.value.image_id == "img3" and raised.value.path == broken
    # Extraction skips the image instead of failing; the cache holds the others.
    cache = extract_features(
        tiny_clip_encoder, paths, ids, tmp_path / "features", "toy", "train", batch_size=2, progress=False
    )
    assert cache.image_ids == ["img0", "img1", "img2", "img4"]
    assert [item["image_id"] for item in cache.meta["skipped"]] == ["img3"]


def test_extraction_checks_ids_before_encoding(
    tiny_clip_encoder: ClipEncoder, image_files, tmp_path: Path
) -> None:
    paths, ids = image_files
    with pytest.raises(ValueError, match="duplicate image ids 'img0'"):
        extract_features(
            tiny_clip_encoder, paths, ["img0"] * len(paths), tmp_path / "f", "toy", "train", progress=False
        )
    with pytest.raises(ValueError, match="5 image paths but 4 image ids"):
        extract_features(tiny_clip_encoder, paths, ids[:4], tmp_path / "f", "toy", "train", progress=False)
