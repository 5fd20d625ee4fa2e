"""Robust image loading, grid features, and resumable, shardable feature extraction.

Everything runs on a tiny CLIP built from a config and on tiny images written by the tests.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

import clipcap.data.images as images_module
import clipcap.features.extract as extract_module
from clipcap.clip import ClipEncoder
from clipcap.data.images import close_shards, open_shard_count
from clipcap.data.records import ImageEntry
from clipcap.features import (
    FeatureCache,
    FeatureCacheError,
    FeatureCacheMismatch,
    ImageReadError,
    cache_expectation,
    extract_entries,
    load_image,
    partial_folder,
    write_summary,
)
from tiny_models import tiny_clip_model

# --------------------------------------------------------------------------------------------- helpers


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


class SimulatedKill(BaseException):
    """Stands for the process being killed: not an ``Exception``, so no handler in the code swallows it."""


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def files_in(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture
def good_entries(tmp_path: Path) -> list[ImageEntry]:
    """Seven readable images of several sizes and formats, with 1-3 references each."""
    folder = tmp_path / "images"
    folder.mkdir()
    entries = []
    sizes = [(40, 30), (64, 64), (25, 50), (33, 33), (80, 20), (32, 45), (50, 50)]
    for index, (width, height) in enumerate(sizes):
        path = folder / f"{index}.{'png' if index % 2 else 'jpg'}"
        noise(width, height, seed=index).save(path)
        references = tuple(f"caption {index}.{k}" for k in range(1 + index % 3))
        entries.append(ImageEntry(f"img{index}", str(path), references, "train"))
    return entries


def bad_entries(folder: Path) -> list[ImageEntry]:
    """A missing file, a truncated JPEG, a text file and a decompression bomb (with max_pixels=5000)."""
    folder.mkdir(exist_ok=True)
    truncated = folder / "truncated.jpg"
    buffer = io.BytesIO()
    noise(48, 48).save(buffer, format="JPEG")
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    text = folder / "notes.jpg"
    text.write_text("not an image at all")
    bomb = folder / "bomb.png"
    Image.new("RGB", (100, 100), "white").save(bomb)
    return [
        ImageEntry("missing", str(folder / "missing.jpg"), ("a",), "train"),
        ImageEntry("truncated", str(truncated), ("b",), "train"),
        ImageEntry("text", str(text), ("c",), "train"),
        ImageEntry("bomb", str(bomb), ("d",), "train"),
    ]


def encode_one(tiny_clip_encoder: ClipEncoder, entry: ImageEntry) -> np.ndarray:
    return tiny_clip_encoder.encode_pil([load_image(entry.image, entry.image_id)])[0].numpy()


# ---------------------------------------------------------------------------------------- load_image


def test_formats_load_as_rgb(tmp_path: Path) -> None:
    formats = ["JPEG", "PNG"] + (["WEBP"] if features.check("webp") else [])
    for name in formats:
        path = tmp_path / f"image.{name.lower()}"
        noise(20, 10).save(path, format=name, **({"lossless": True} if name == "WEBP" else {}))
        image = load_image(path, "x")
        assert image.mode == "RGB" and image.size == (20, 10), name
        if name != "JPEG":
            np.testing.assert_array_equal(np.asarray(image), np.asarray(noise(20, 10)))


def test_grayscale_and_cmyk(tmp_path: Path) -> None:
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, mode="L")
    gray.save(tmp_path / "gray.png")
    loaded = np.asarray(load_image(tmp_path / "gray.png", "g"))
    assert loaded.shape == (8, 8, 3)
    for channel in range(3):
        np.testing.assert_array_equal(loaded[:, :, channel], np.asarray(gray))

    rgb = Image.new("RGB", (16, 16), (200, 40, 30))
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    image = load_image(tmp_path / "cmyk.jpg", "c")
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image).astype(int) - [200, 40, 30]).max() <= 6


def test_transparency_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # transparent black
    rgba[:2] = (255, 0, 0, 255)  # opaque red top half
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    loaded = np.asarray(load_image(tmp_path / "rgba.png", "a"))
    assert (loaded[:2] == (255, 0, 0)).all() and (loaded[2:] == 255).all()

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 black (transparent), 1 blue
    palette.paste(1, (0, 0, 4, 2))
    palette.save(tmp_path / "palette.png", transparency=0)
    assert Image.open(tmp_path / "palette.png").mode == "P"
    loaded = np.asarray(load_image(tmp_path / "palette.png", "p"))
    assert (loaded[:2] == (0, 0, 255)).all() and (loaded[2:] == 255).all()


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    pixels = np.zeros((20, 30, 3), dtype=np.uint8)
    pixels[:, :15] = (255, 0, 0)  # left half red
    pixels[:, 15:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display after rotating 90° clockwise
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    image = load_image(tmp_path / "rotated.jpg", "r")
    assert image.size == (20, 30)  # transposed
    array = np.asarray(image).astype(int)
    assert array[2, 10, 0] > 200 and array[2, 10, 2] < 60  # the red half is now on top
    assert array[-3, 10, 2] > 200 and array[-3, 10, 0] < 60


def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 128, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    loaded = np.asarray(load_image(tmp_path / "deep.png", "d"))
    np.testing.assert_array_equal(loaded[0, :, 0], [0, 128, 255, 4])


@pytest.mark.parametrize(
    ("problem", "reason"),
    [
        ("missing", "file not found"),
        ("truncated", "truncated"),
        ("text", "not an image"),
        ("bomb", "decompression bomb (10000 pixels > limit 5000)"),
    ],
)
def test_bad_images_raise_with_short_reason(tmp_path: Path, problem: str, reason: str) -> None:
    entry = {entry.image_id: entry for entry in bad_entries(tmp_path)}[problem]
    before = open_fds()
    with pytest.raises(ImageReadError) as raised:
        load_image(entry.image, entry.image_id, max_pixels=5000)
    assert raised.value.reason == reason
    assert raised.value.image_id == problem and raised.value.source == entry.image
    assert entry.image in str(raised.value)
    assert open_fds() == before  # no handle left open on failure
    # Workers send errors back pickled.
    copy = pickle.loads(pickle.dumps(raised.value))
    assert (copy.source, copy.image_id, copy.reason) == (entry.image, problem, reason)


def test_max_pixels_none_disables_the_check_and_pil_warning_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    assert load_image(tmp_path / "big.png", "big", max_pixels=None).size == (100, 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # 10000 px: PIL warns (it errors above 2x)
    with pytest.raises(ImageReadError, match="decompression bomb"):
        load_image(tmp_path / "big.png", "big", max_pixels=None)


def test_no_file_handle_left_open(tmp_path: Path) -> None:
    noise(30, 30).save(tmp_path / "a.png")
    before = open_fds()
    for _ in range(3):
        image = load_image(tmp_path / "a.png", "a")
    assert open_fds() == before
    assert image.getpixel((0, 0)) is not None  # pixels still usable after the file is closed


def test_tar_shard_members(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as archive:
        for index in range(3):
            buffer = io.BytesIO()
            noise(12, 10, seed=index).save(buffer, format="PNG")
            info = tarfile.TarInfo(f"{index:09d}.png")
            info.size = len(buffer.getvalue())
            archive.addfile(info, io.BytesIO(buffer.getvalue()))
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(images_module.tarfile, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    close_shards()
    for index in range(3):
        image = load_image(f"{shard}::{index:09d}.png", f"s{index}")
        np.testing.assert_array_equal(np.asarray(image), np.asarray(noise(12, 10, seed=index)))
    assert len(opened) == 1 and open_shard_count() == 1  # the shard is opened once per process
    with pytest.raises(ImageReadError) as raised:
        load_image(f"{shard}::999.png", "nope")
    assert raised.value.reason == "member not found in shard"
    with pytest.raises(ImageReadError) as raised:
        load_image(f"{tmp_path / 'gone.tar'}::0.png", "gone")
    assert raised.value.reason == "shard not found"
    close_shards()
    assert open_shard_count() == 0


def test_forked_worker_opens_its_own_shard(tmp_path: Path) -> None:
    """A forked DataLoader worker must not read through the parent's tar file object: the two would share
    one file offset."""
    import multiprocessing

    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as archive:
        buffer = io.BytesIO()
        noise(8, 8).save(buffer, format="PNG")
        info = tarfile.TarInfo("0.png")
        info.size = len(buffer.getvalue())
        archive.addfile(info, io.BytesIO(buffer.getvalue()))
    source = f"{shard}::0.png"
    close_shards()
    load_image(source, "parent")
    parent_archive = images_module._shard_cache.shards[str(shard)]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()

    def child() -> None:
        load_image(source, "child")
        queue.put(images_module._shard_cache.shards[str(shard)] is parent_archive)

    process = context.Process(target=child)
    process.start()
    reused_parent_archive = queue.get(timeout=20)
    process.join(timeout=20)
    assert process.exitcode == 0 and reused_parent_archive is False
    assert images_module._shard_cache.shards[str(shard)] is parent_archive  # the parent's is untouched
    close_shards()


# ------------------------------------------------------------------------------------- grid features


def test_grid_features_from_one_forward_pass(tiny_clip_encoder: ClipEncoder) -> None:
    pixels = tiny_clip_encoder.preprocess([noise(40, 30, seed=1), noise(32, 32, seed=2)])
    calls = []
    hook = tiny_clip_encoder.model.vision_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        pooled, grid = tiny_clip_encoder.encode_images_and_grid(pixels)
    finally:
        hook.remove()
    assert len(calls) == 1
    assert (
        pooled.shape == (2, 16)
        and grid.shape == (2, tiny_clip_encoder.grid_size, 16)
        and tiny_clip_encoder.grid_size == 16
    )
    with torch.no_grad():
        expected_pooled = tiny_clip_encoder.model.get_image_features(pixel_values=pixels).pooler_output
        hidden = tiny_clip_encoder.model.vision_model(pixel_values=pixels).last_hidden_state
        expected_grid = tiny_clip_encoder.model.visual_projection(
            tiny_clip_encoder.model.vision_model.post_layernorm(hidden[:, 1:])
        )
    torch.testing.assert_close(pooled, expected_pooled, rtol=0, atol=0)
    torch.testing.assert_close(grid, expected_grid)
    torch.testing.assert_close(tiny_clip_encoder.encode_image_grid(pixels), grid)
    assert not torch.allclose(grid[:, 0], grid[:, 1])  # patches differ from each other


# -------------------------------------------------------------------------------------- grid caches

META = {"clip": {"name": "tiny", "vision_weights_sha1": "abc"}, "dataset": "toy", "split": "val"}


def test_grid_cache_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pooled = rng.standard_normal((3, 8)).astype(np.float32)
    grid = rng.standard_normal((3, 4, 8)).astype(np.float32)
    cache = FeatureCache.write(tmp_path / "c", ["a", "b", "c"], pooled, META, grid=grid)
    reopened = FeatureCache.open(tmp_path / "c")
    assert isinstance(reopened.grid, np.memmap) and reopened.grid.dtype == np.float32
    assert reopened.meta["grid_shape"] == [4, 8] and reopened.grid_shape == (4, 8)
    np.testing.assert_array_equal(reopened.get_grid("b"), grid[1])
    np.testing.assert_array_equal(cache.get("c"), pooled[2])

    half = FeatureCache.write(tmp_path / "h", ["a", "b", "c"], pooled, META, grid=grid, grid_dtype="float16")
    assert half.grid.dtype == np.float16 and half.meta["grid_dtype"] == "float16"
    assert half.get_grid("a").dtype == np.float32
    np.testing.assert_allclose(half.get_grid("a"), grid[0], atol=1e-2)

    plain = FeatureCache.write(tmp_path / "p", ["a"], pooled[:1], META)
    assert plain.grid is None
    with pytest.raises(ValueError, match="no grid features"):
        plain.get_grid("a")
    with pytest.raises(ValueError, match="same projected space"):
        FeatureCache.write(tmp_path / "x", ["a", "b", "c"], pooled, META, grid=grid[:, :, :4])


def test_cache_without_grid_keys_still_opens(tmp_path: Path) -> None:
    """Caches written before grid features existed (no grid_shape in meta) keep the format version."""
    FeatureCache.write(tmp_path / "c", ["a"], np.ones((1, 8), np.float32), META)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    del meta["grid_shape"], meta["grid_dtype"]
    (tmp_path / "c" / "meta.json").write_text(json.dumps(meta))
    assert FeatureCache.open(tmp_path / "c").grid is None


@pytest.mark.parametrize(
    ("how", "error", "match"),
    [
        ("missing", FileNotFoundError, "grid_features.npy is missing"),
        ("truncated", FeatureCacheError, "grid_features.npy: not a readable"),
        ("wrong shape", FeatureCacheError, r"grid_features.npy: shape \(3, 5, 8\), expected \(3, 4, 8\)"),
        ("float64", FeatureCacheError, "grid_features.npy: expected float32"),
        ("unrecorded", FeatureCacheError, "grid_features.npy: present, but .*records no grid_shape"),
        ("bad meta", FeatureCacheError, "meta.json: grid_shape must be"),
    ],
)
def test_inconsistent_grid_is_refused(tmp_path: Path, how: str, error: type, match: str) -> None:
    folder = tmp_path / "c"
    grid = np.zeros((3, 4, 8), np.float32)
    FeatureCache.write(folder, ["a", "b", "c"], np.zeros((3, 8), np.float32), META, grid=grid)
    meta_path, grid_path = folder / "meta.json", folder / "grid_features.npy"
    meta = json.loads(meta_path.read_text())
    if how == "missing":
        grid_path.unlink()
    elif how == "truncated":
        grid_path.write_bytes(grid_path.read_bytes()[:-10])
    elif how == "wrong shape":
        np.save(grid_path, np.zeros((3, 5, 8), np.float32))
    elif how == "float64":
        np.save(grid_path, np.zeros((3, 4, 8)))
    elif how == "unrecorded":
        meta_path.write_text(json.dumps({**meta, "grid_shape": None}))
    else:
        meta_path.write_text(json.dumps({**meta, "grid_shape": [4]}))
    with pytest.raises(error, match=match):
        FeatureCache.open(folder)


# ---------------------------------------------------------------------------------------- extraction


def test_bad_images_are_skipped_and_the_rest_match_direct_encoding(
    tiny_clip_encoder: ClipEncoder, good_entries: list[ImageEntry], tmp_path: Path
) -> None:
    bad = bad_entries(tmp_path / "bad")
    entries = [*good_entries[:2], bad[0], *good_entries[2:4], *bad[1:], *good_entries[4:]]
    folder = tmp_path / "features" / "train"
    report = extract_entries(
        tiny_clip_encoder, entries, folder, "toy", "train", batch_size=3, progress=False, max_pixels=5000
    )
    assert report.complete and report.images == 11 and report.extracted == 7
    assert [(item["image_id"], item["reason"]) for item in report.skipped] == [
        ("missing", "file not found"),
        ("truncated", "truncated"),
        ("text", "not an image"),
        ("bomb", "decompression bomb (10000 pixels > limit 5000)"),
    ]
    assert report.skipped[1]["source"] == bad[1].image
    assert report.captions == sum(len(entry.references) for entry in good_entries) == 13
    assert json.loads(report.to_json())["extracted"] == 7

    cache = FeatureCache.open(folder, expect=cache_expectation(tiny_clip_encoder, "toy", "train"))
    assert cache.image_ids == [entry.image_id for entry in good_entries]
    expected = np.stack([encode_one(tiny_clip_encoder, entry) for entry in good_entries])
    np.testing.assert_allclose(cache.features, expected, rtol=1e-5, atol=1e-5)
    assert cache.grid is None and cache.meta["skipped"] == report.skipped
    assert sorted(path.name for path in folder.parent.iterdir()) == ["train"]  # partial folder removed


def test_duplicates_and_bad_arguments_fail_before_any_work(
    tiny_clip_encoder: ClipEncoder, good_entries: list[ImageEntry], tmp_path: Path
) -> None:
    folder = tmp_path / "features" / "train"
    with pytest.raises(ValueError, match="duplicate image ids 'img1'"):
        extract_entries(
            tiny_clip_encoder, [*good_entries, good_entries[1]], folder, "toy", "train", progress=False
        )
    with pytest.raises(ValueError, match="shard"):
        extract_entries(tiny_clip_encoder, good_entries, folder, "toy", "train", shard=(2, 2), progress=False)
    not_a_cache = tmp_path / "photos"
    not_a_cache.mkdir()
    (not_a_cache / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="not a feature cache"):
        extract_entries(tiny_clip_encoder, good_entries, not_a_cache, "toy", "train", progress=False)
    assert not (tmp_path / "features").exists() and not partial_folder(not_a_cache).exists()


def test_resume_after_kill_is_byte_identical(
    tiny_clip_encoder: ClipEncoder,
    good_entries: list[ImageEntry],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entries = [*good_entries, *bad_entries(tmp_path / "bad")[:1]]  # 8 entries: 4 chunks of 2
    reference = tmp_path / "uninterrupted"
    extract_entries(tiny_clip_encoder, entries, reference, "toy", "train", batch_size=2, progress=False)

    folder = tmp_path / "resumed"
    real_encode = tiny_clip_encoder.encode_images
    calls = []

    kill_at = [3]

    def killed_on_third_batch(pixels: torch.Tensor) -> torch.Tensor:
        calls.append(pixels.shape[0])
        if len(calls) in kill_at:
            raise SimulatedKill
        return real_encode(pixels)

    monkeypatch.setattr(tiny_clip_encoder, "encode_images", killed_on_third_batch)
    with pytest.raises(SimulatedKill):
        extract_entries(tiny_clip_encoder, entries, folder, "toy", "train", batch_size=2, progress=False)
    partial = partial_folder(folder)
    assert sorted(path.name for path in partial.glob("chunk-*.json")) == [
        "chunk-000000.json",
        "chunk-000001.json",
    ]
    for candidate in (folder, partial):  # nothing opens as a cache in between
        with pytest.raises(FileNotFoundError):
            FeatureCache.open(candidate)

    calls.clear()
    kill_at.clear()
    report = extract_entries(tiny_clip_encoder, entries, folder, "toy", "train", batch_size=2, progress=False)
    assert calls == [2, 1]  # only chunks 2 and 3 (whose second image is missing) are encoded again
    assert report.complete and report.extracted == 7 and len(report.skipped) == 1
    assert files_in(folder) == files_in(reference)  # features.npy, image_ids.json, meta.json: same bytes
    assert not partial.exists()


def test_an_up_to_date_cache_is_kept_unless_forced(
    tiny_clip_encoder: ClipEncoder,
    good_entries: list[ImageEntry],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = tmp_path / "cache"
    first = extract_entries(
        tiny_clip_encoder, good_entries, folder, "toy", "train", batch_size=2, progress=False
    )
    written = files_in(folder)
    real_encode = tiny_clip_encoder.encode_images
    calls = []

    def counting(pixels: torch.Tensor) -> torch.Tensor:
        calls.append(pixels.shape[0])
        return real_encode(pixels)

    monkeypatch.setattr(tiny_clip_encoder, "encode_images", counting)
    again = extract_entries(
        tiny_clip_encoder, good_entries, folder, "toy", "train", batch_size=2, progress=False
    )
    assert calls == [] and files_in(folder) == written
    assert (again.complete, again.extracted, again.captions) == (True, first.extracted, first.captions)
    extract_entries(
        tiny_clip_encoder, good_entries[:-1], folder, "toy", "train", batch_size=2, progress=False
    )
    assert calls, "other images: the cache is not up to date"
    calls.clear()
    extract_entries(
        tiny_clip_encoder, good_entries[:-1], folder, "toy", "train", batch_size=2, progress=False, force=True
    )
    assert calls


def test_changed_request_starts_the_partial_folder_over(
    tiny_clip_encoder: ClipEncoder,
    good_entries: list[ImageEntry],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    folder = tmp_path / "features"

    real_encode = tiny_clip_encoder.encode_images

    def killed_on_last_chunk(pixels: torch.Tensor) -> torch.Tensor:
        if len(pixels) == 1:
            raise SimulatedKill
        return real_encode(pixels)

    monkeypatch.setattr(tiny_clip_encoder, "encode_images", killed_on_last_chunk)
    with pytest.raises(SimulatedKill):  # chunks of 2 then a last chunk of 1 image
        extract_entries(tiny_clip_encoder, good_entries, folder, "toy", "train", batch_size=2, progress=False)
    assert len(list(partial_folder(folder).glob("chunk-*.json"))) == 3
    monkeypatch.undo()

    with caplog.at_level(logging.WARNING, logger="clipcap.features.extract"):
        report = extract_entries(
            tiny_clip_encoder, good_entries, folder, "toy", "train", batch_size=3, progress=False
        )
    assert "starting it over" in caplog.text
    assert report.complete
    fresh = tmp_path / "fresh"
    extract_entries(tiny_clip_encoder, good_entries, fresh, "toy", "train", batch_size=3, progress=False)
    assert files_in(folder) == files_in(fresh)


def test_shards_fill_one_partial_folder(
    tiny_clip_encoder: ClipEncoder, good_entries: list[ImageEntry], tmp_path: Path
) -> None:
    reference = tmp_path / "single"
    extract_entries(tiny_clip_encoder, good_entries, reference, "toy", "train", batch_size=2, progress=False)

    folder = tmp_path / "sharded"
    first = extract_entries(
        tiny_clip_encoder, good_entries, folder, "toy", "train", batch_size=2, shard=(0, 2), progress=False
    )
    assert not first.complete and not folder.exists()
    assert first.extracted == 4  # chunks 0 and 2: img0, img1, img4, img5
    assert first.captions == sum(len(good_entries[i].references) for i in (0, 1, 4, 5))
    second = extract_entries(
        tiny_clip_encoder, good_entries, folder, "toy", "train", batch_size=2, shard=(1, 2), progress=False
    )
    assert second.complete and second.extracted == 7
    assert files_in(folder) == files_in(reference)
    assert not partial_folder(folder).exists()


def test_a_shard_that_waited_for_the_lock_finds_the_cache_assembled(
    tiny_clip_encoder: ClipEncoder,
    good_entries: list[ImageEntry],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = tmp_path / "sharded"
    extract_entries(
        tiny_clip_encoder, good_entries, folder, "toy", "train", batch_size=2, shard=(0, 2), progress=False
    )
    real_assemble = extract_module._assemble_or_find
    assembled_by_other = []

    def other_shard_assembles_first(folder: Path, partial: Path, *args):
        assembled_by_other.append(real_assemble(folder, partial, *args))  # the other process, under the lock
        assert not partial.exists()
        return real_assemble(folder, partial, *args)

    monkeypatch.setattr(extract_module, "_assemble_or_find", other_shard_assembles_first)
    report = extract_entries(
        tiny_clip_encoder, good_entries, folder, "toy", "train", batch_size=2, shard=(1, 2), progress=False
    )
    assert assembled_by_other[0] is not None
    assert report.complete and report.extracted == 7
    assert not partial_folder(folder).exists()


def test_partial_lock_is_exclusive(tmp_path: Path) -> None:
    partial = tmp_path / ".c.partial"
    entered = []

    def other() -> None:
        with extract_module._partial_lock(partial):
            entered.append(time.monotonic())

    with extract_module._partial_lock(partial):
        thread = threading.Thread(target=other)
        thread.start()
        time.sleep(0.2)
        assert entered == []
        released = time.monotonic()
    thread.join(timeout=5)
    assert len(entered) == 1 and entered[0] >= released


def test_grid_extraction(
    tiny_clip_encoder: ClipEncoder, good_entries: list[ImageEntry], tmp_path: Path
) -> None:
    entries = good_entries[:5]
    plain = tmp_path / "plain"
    extract_entries(tiny_clip_encoder, entries, plain, "toy", "train", batch_size=2, progress=False)
    folder = tmp_path / "grid"
    report = extract_entries(
        tiny_clip_encoder, entries, folder, "toy", "train", batch_size=2, grid=True, progress=False
    )
    assert report.grid and report.complete
    cache = FeatureCache.open(folder, expect=cache_expectation(tiny_clip_encoder, "toy", "train"))
    assert cache.grid.shape == (5, 16, 16) and cache.meta["grid_shape"] == [16, 16]
    # One forward pass yields the same pooled features as a pooled-only extraction.
    assert (folder / "features.npy").read_bytes() == (plain / "features.npy").read_bytes()
    for row, entry in enumerate(entries):
        pixels = tiny_clip_encoder.preprocess([load_image(entry.image, entry.image_id)])
        np.testing.assert_allclose(
            cache.get_grid(entry.image_id), tiny_clip_encoder.encode_image_grid(pixels)[0], atol=1e-5
        )
        np.testing.assert_allclose(cache.features[row], encode_one(tiny_clip_encoder, entry), atol=1e-5)

    half = extract_entries(
        tiny_clip_encoder,
        entries,
        tmp_path / "half",
        "toy",
        "train",
        batch_size=2,
        grid=True,
        grid_dtype="float16",
        progress=False,
    )
    assert half.complete and FeatureCache.open(tmp_path / "half").grid.dtype == np.float16

    other = ClipEncoder.from_model(tiny_clip_model(seed=1), name="tiny")  # same architecture, other weights
    with pytest.raises(FeatureCacheMismatch, match="clip.vision_weights_sha1"):
        FeatureCache.open(folder, expect=cache_expectation(other, "toy", "train"))


def test_workers_and_tar_shards_give_the_same_cache(
    tiny_clip_encoder: ClipEncoder, good_entries: list[ImageEntry], tmp_path: Path
) -> None:
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as archive:
        for entry in good_entries[:3]:
            archive.add(entry.image, arcname=Path(entry.image).name)
    entries = [
        ImageEntry(entry.image_id, f"{shard}::{Path(entry.image).name}", entry.references, "train")
        for entry in good_entries[:3]
    ] + good_entries[3:]
    assert (
        pickle.loads(pickle.dumps(tiny_clip_encoder.preprocess)) == tiny_clip_encoder.preprocess
    )  # what each worker receives
    close_shards()
    load_image(entries[0].image, "img0")  # this process has the shard open before the workers fork
    assert open_shard_count() == 1
    serial = tmp_path / "serial"
    extract_entries(tiny_clip_encoder, good_entries, serial, "toy", "train", batch_size=2, progress=False)
    parallel = tmp_path / "parallel"
    report = extract_entries(
        tiny_clip_encoder, entries, parallel, "toy", "train", batch_size=2, num_workers=2, progress=False
    )
    assert report.complete and report.extracted == 7
    assert (parallel / "features.npy").read_bytes() == (serial / "features.npy").read_bytes()
    close_shards()


def test_summary_merges_splits(
    tiny_clip_encoder: ClipEncoder, good_entries: list[ImageEntry], tmp_path: Path
) -> None:
    root = tmp_path / "features"
    bad = bad_entries(tmp_path / "bad")
    train = extract_entries(
        tiny_clip_encoder,
        [*good_entries[:4], bad[0]],
        root / "train",
        "toy",
        "train",
        batch_size=2,
        progress=False,
    )
    path = write_summary(
        root, [train], dropped_empty_captions={"train": 3}, annotation_notes={"train": {"repeated_images": 2}}
    )
    assert path == root / "summary.json"
    val_entries = [ImageEntry(e.image_id, e.image, e.references, "val") for e in good_entries[4:]]
    val = extract_entries(
        tiny_clip_encoder, val_entries, root / "val", "toy", "val", batch_size=2, progress=False
    )
    shard_only = extract_entries(
        tiny_clip_encoder,
        good_entries,
        root / "test",
        "toy",
        "test",
        batch_size=2,
        shard=(0, 2),
        progress=False,
    )
    write_summary(root, [val, shard_only], dropped_empty_captions={"val": 0})

    summary = json.loads(path.read_text())
    assert list(summary["splits"]) == ["train", "val"]  # the unfinished shard is not recorded
    assert summary["splits"]["train"] == {
        "dataset": "toy",
        "images": 5,
        "extracted": 4,
        "captions": 1 + 2 + 3 + 1,
        "dropped_empty_captions": 3,
        "skipped_count": 1,
        "skipped": [{"image_id": "missing", "source": bad[0].image, "reason": "file not found"}],
        "grid": False,
        "annotations": {"repeated_images": 2},
    }
    assert summary["splits"]["val"]["annotations"] == {}
    assert (
        summary["splits"]["val"]["extracted"] == 3 and summary["splits"]["val"]["dropped_empty_captions"] == 0
    )
    leftovers = [p.name for p in root.iterdir() if p.name not in {"train", "val", "summary.json"}]
    assert all(not name.startswith("summary.json.tmp") for name in leftovers)


def test_an_image_with_non_finite_features_is_skipped_and_named(
    tiny_clip_encoder: ClipEncoder,
    good_entries: list[ImageEntry],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A NaN from the tiny_clip_encoder (an fp16 overflow, a broken model) must not reach the cache: the image is
    skipped and reported, as an unreadable one is."""
    original = type(tiny_clip_encoder).encode_images

    def with_nan_for_the_third(self, pixels):
        features = original(self, pixels)
        features[2] = float("nan")
        return features

    monkeypatch.setattr(type(tiny_clip_encoder), "encode_images", with_nan_for_the_third)
    report = extract_entries(
        tiny_clip_encoder, good_entries, tmp_path / "cache", "toy", "train", batch_size=4, progress=False
    )
    # Row 2 of each chunk of 4: img2 and img6.
    assert [(item["image_id"], item["reason"]) for item in report.skipped] == [
        ("img2", "non-finite features (NaN or inf)"),
        ("img6", "non-finite features (NaN or inf)"),
    ]
    cache = FeatureCache.open(tmp_path / "cache")
    assert cache.image_ids == ["img0", "img1", "img3", "img4", "img5"]
    assert report.skipped[0]["source"] == good_entries[2].image
