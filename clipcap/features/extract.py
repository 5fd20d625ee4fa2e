"""Extraction of frozen-CLIP image features into a :class:`~clipcap.features.cache.FeatureCache`.

The encoder is any :class:`~clipcap.features.encoders.ImageEncoder`: a CLIP, or BLIP's vision encoder for a
BLIP captioner (:func:`~clipcap.features.encoders.load_image_encoder` picks it by the checkpoint).

:func:`extract_entries` encodes each image of a split once, in batches, with images read and preprocessed
in DataLoader workers. It is built to run for hours over millions of images:

- **bad images are skipped**, never fatal: missing, corrupt, truncated or oversized files are listed in
  the report (id, source, reason) and left out of the cache;
- **resumable**: the entries are cut into fixed chunks of ``batch_size`` (chunk c is
  ``entries[c*B:(c+1)*B]``, which is also exactly one forward batch), and each finished chunk is saved
  in a partial folder beside the cache, ``.<cache name>.partial/``. A rerun skips the chunks already
  there. Because chunk boundaries and batch contents do not depend on where a run stopped, an
  interrupted-and-resumed extraction writes the same bytes as an uninterrupted one;
- **shardable**: ``shard=(k, n)`` does only the chunks with ``c % n == k``, so n processes (on n GPUs or
  machines sharing a filesystem) fill one partial folder; whichever finds every chunk done assembles the
  cache, under a file lock so that two finishing shards do not both assemble it;
- **atomic**: the cache is written with :meth:`FeatureCache.write` only once every chunk exists, so an
  interrupted extraction never leaves a folder that opens as a valid cache;
- **fresh**: a cache is up to date only for the same images on disk: it records a digest of every image's
  file name, size and modification time (a shard member: its shard's), so an image downloaded, replaced or
  deleted since is picked up by a plain rerun, which extracts the split again. An image folder that does
  not exist is an error, not a split of "file not found" images.

The partial folder holds ``manifest.json`` (what is being extracted: image ids in order, batch size,
CLIP fingerprint and dtype, preprocessing, grid flag and dtype, pixel limit, dataset, split, and a digest
of all that), a lock file, and per finished chunk ``chunk-<c>.features.npy`` (pooled features of the
chunk's good images), ``chunk-<c>.grid.npy`` (with grid features) and ``chunk-<c>.json`` (the kept image
ids, the skipped images with reasons, and the manifest digest). The JSON is written last and marks the
chunk as done; every file is written under a temporary name and renamed, so a killed process leaves at
worst an unfinished chunk that is recomputed.

Legend for shapes: N = number of images, B = batch (chunk) size, D = CLIP embedding size, G = grid tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import clipcap
from clipcap.data.images import DEFAULT_MAX_PIXELS, ImageReadError, close_shards, load_image
from clipcap.data.records import SHARD_MEMBER_SEPARATOR, ImageEntry
from clipcap.features.cache import (
    GRID_DTYPES,
    INFORMATIONAL_CLIP_KEYS,
    FeatureCache,
    RowBlocks,
    cache_expectation,
    validate_image_ids,
)
from clipcap.features.encoders import ImageEncoder, ImagePreprocessor
from clipcap.files import atomic_save_npy, atomic_write_json

__all__ = [
    "ExtractionReport",
    "ImageReadError",
    "extract_entries",
    "extract_features",
    "load_image",
    "partial_folder",
    "write_summary",
]

logger = logging.getLogger(__name__)

PARTIAL_FORMAT = 1
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".lock"
SUMMARY_FILE = "summary.json"
_SUMMARY_LOCK_FILE = ".summary.json.lock"


@dataclasses.dataclass
class ExtractionReport:
    """What an extraction did.

    Attributes:
        dataset: dataset name.
        split: split name.
        images: entries asked for (the whole split, also for a shard).
        extracted: images with features: in the cache when ``complete``, else in this shard's chunks.
        skipped: ``{"image_id", "source", "reason"}`` for each image left out (same scope as ``extracted``).
        captions: reference captions of the extracted images.
        grid: whether grid features were extracted.
        complete: the cache was assembled (by this process or, for a shard, by another); False when only
            this shard's chunks are done and others are still missing.
        seconds: wall time of this call.
        folder: the cache folder.
    """

    dataset: str
    split: str
    images: int
    extracted: int
    skipped: list[dict[str, str]]
    captions: int
    grid: bool
    complete: bool
    seconds: float
    folder: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The report as a JSON string."""
        return json.dumps(self.to_dict(), indent=2)


def partial_folder(folder: str | os.PathLike[str]) -> Path:
    """Where the unfinished chunks of the cache ``folder`` live: ``.<name>.partial`` beside it."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.partial"


def extract_entries(
    encoder: ImageEncoder,
    entries: Sequence[ImageEntry],
    folder: str | os.PathLike[str],
    dataset: str,
    split: str,
    batch_size: int = 64,
    num_workers: int = 0,
    grid: bool = False,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    grid_dtype: str = "float32",
    force: bool = False,
) -> ExtractionReport:
    """Encodes a split's images with a frozen CLIP into a feature cache; resumable and shardable.

    See the module docstring for the partial folder. A rerun whose manifest equals the partial folder's
    (same image ids in the same order, batch size, CLIP weights and dtype, preprocessing, grid settings,
    pixel limit, dataset and split; where the CLIP was loaded from does not count) continues it. With a
    different manifest the partial folder is **started over**, with a warning: its chunks cannot be used
    for what is now asked, and a stale partial folder is almost always the leftover of an abandoned run
    that nobody wants to delete by hand. Each chunk records the manifest's digest, so chunks of two
    different manifests are never mixed, even when processes with different settings share the folder.

    A complete cache at ``folder`` made by the same manifest is up to date: it is reported and kept, and
    nothing is encoded (``force`` re-extracts it). Any other existing cache stays in place until the new
    one replaces it atomically.

    Args:
        encoder: the CLIP image encoder (on the device to run on).
        entries: the images; each ``image_id`` once (an image with several captions is one entry).
        folder: the cache folder (an existing cache there is replaced).
        dataset: dataset name recorded in the cache.
        split: split recorded in the cache.
        batch_size: images per chunk and forward pass (part of the manifest: keep it when resuming).
        num_workers: DataLoader worker processes reading and preprocessing images (0: this process).
        grid: also store (G, D) grid features (``encoder.encode_images_and_grid``).
        shard: ``(k, n)``: do only chunks ``c`` with ``c % n == k``; None does all of them.
        progress: show a progress bar.
        max_pixels: skip images with more pixels (decompression bombs); None disables the check.
        grid_dtype: storage of grid features, ``float32`` or ``float16``.
        force: re-extract even when the cache at ``folder`` is up to date.

    Returns:
        The report; ``complete`` says whether the cache was assembled.

    Raises:
        ValueError: repeated image ids (before any work) or invalid arguments.
        FileExistsError: ``folder`` exists and is not a feature cache.
    """
    started = time.perf_counter()
    entries = list(entries)
    ids = validate_image_ids([entry.image_id for entry in entries], source=f"{dataset}/{split} entries")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if shard is not None:
        index, count = shard
        if not 0 <= index < count:
            raise ValueError(f"shard must be (k, n) with 0 <= k < n, got {shard}")
    if grid_dtype not in GRID_DTYPES:
        raise ValueError(f"grid_dtype must be one of {GRID_DTYPES}, got {grid_dtype!r}")
    folder = Path(folder)
    FeatureCache.check_replaceable(folder)
    partial = partial_folder(folder)

    _check_image_folders(entries, dataset, split)
    manifest = _manifest(encoder, ids, dataset, split, batch_size, grid, grid_dtype, max_pixels)
    on_disk = _sources_on_disk(entries)
    references = {entry.image_id: len(entry.references) for entry in entries}
    if not force and FeatureCache.exists(folder):
        try:
            existing = FeatureCache.open(folder)
        except (OSError, ValueError):
            existing = None  # unreadable: extract it anew
        same_extraction = (
            existing is not None and existing.meta.get("extraction_digest") == manifest["digest"]
        )
        if same_extraction and existing.meta.get("sources_digest") != on_disk["digest"]:
            logger.warning(
                "%s was extracted from other image files (%s of its %d images were on disk then, %d are now, "
                "and sizes or modification times may differ); extracting the split again",
                folder,
                existing.meta.get("sources_present", "an unknown number"),
                len(ids),
                on_disk["present"],
            )
        elif same_extraction:
            logger.info("%s is up to date (same image files, CLIP and settings); nothing to extract", folder)
            return ExtractionReport(
                dataset=dataset,
                split=split,
                images=len(ids),
                extracted=len(existing),
                skipped=list(existing.meta.get("skipped", [])),
                captions=sum(references.get(image_id, 0) for image_id in existing.image_ids),
                grid=grid,
                complete=True,
                seconds=time.perf_counter() - started,
                folder=str(folder),
            )
    chunk_count = math.ceil(len(ids) / batch_size)
    mine = [c for c in range(chunk_count) if shard is None or c % shard[1] == shard[0]]
    with _partial_lock(partial):
        _prepare_partial(partial, manifest)
    done = _done_chunks(partial)
    pending = [c for c in mine if c not in done]

    def chunk_rows(chunk: int) -> range:
        return range(chunk * batch_size, min((chunk + 1) * batch_size, len(ids)))

    sources = [(entry.image_id, entry.image) for entry in entries]
    dataset_of_chunks = _ChunkDataset(sources, pending, batch_size, encoder.preprocess, max_pixels)
    loader = DataLoader(
        dataset_of_chunks,
        batch_size=None,  # each item is already a whole chunk
        num_workers=num_workers,
        collate_fn=_as_is,
        pin_memory=encoder.device.type == "cuda",
    )
    shard_text = "" if shard is None else f" shard {shard[0]}/{shard[1]}"
    try:
        with tqdm(
            total=sum(len(chunk_rows(c)) for c in mine),
            initial=sum(len(chunk_rows(c)) for c in mine if c in done),
            disable=not progress,
            unit="img",
            desc=f"CLIP features {dataset}/{split}{shard_text}",
        ) as bar:
            for item in loader:
                _encode_and_save_chunk(encoder, partial, manifest["digest"], item, grid, grid_dtype)
                bar.update(len(chunk_rows(item["chunk"])))
    finally:
        if num_workers == 0:
            close_shards()

    done = _done_chunks(partial) if partial.is_dir() else set()
    cache: FeatureCache | None = None
    if all(c in done for c in range(chunk_count)):
        with _partial_lock(partial):
            cache = _assemble_or_find(
                folder, partial, manifest, on_disk, encoder, chunk_count, grid, grid_dtype
            )
    if cache is not None:
        kept = cache.image_ids
        skipped = list(cache.meta.get("skipped", []))
    else:
        kept, skipped = _shard_outcome(partial, mine)
    report = ExtractionReport(
        dataset=dataset,
        split=split,
        images=len(ids),
        extracted=len(kept),
        skipped=skipped,
        captions=sum(references.get(image_id, 0) for image_id in kept),
        grid=grid,
        complete=cache is not None,
        seconds=time.perf_counter() - started,
        folder=str(folder),
    )
    if skipped:
        shown = "; ".join(f"{item['image_id']} ({item['reason']})" for item in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        logger.warning("%s/%s: skipped %d images: %s%s", dataset, split, len(skipped), shown, more)
    return report


def extract_features(
    encoder: ImageEncoder,
    image_paths: Sequence[str | os.PathLike[str]],
    image_ids: Sequence[str],
    folder: str | os.PathLike[str],
    dataset: str,
    split: str,
    batch_size: int = 64,
    progress: bool = True,
    num_workers: int = 0,
    grid: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> FeatureCache:
    """Encodes image files with a frozen CLIP and writes their features as a cache.

    A thin wrapper of :func:`extract_entries` for a plain list of files (no captions): unreadable images
    are skipped (logged) and absent from the cache.

    Args:
        encoder: the CLIP image encoder.
        image_paths: N image files (or ``<shard.tar>::<member>``).
        image_ids: N unique ids, in the same order.
        folder: the cache folder (an existing cache there is replaced).
        dataset: dataset name recorded in the cache.
        split: split recorded in the cache.
        batch_size: images per forward pass.
        progress: show a progress bar.
        num_workers: image-reading worker processes.
        grid: also store grid features.
        max_pixels: the decompression-bomb limit.

    Returns:
        The written cache.
    """
    ids = validate_image_ids(image_ids)
    paths = list(image_paths)
    if len(paths) != len(ids):
        raise ValueError(f"{len(paths)} image paths but {len(ids)} image ids")
    entries = [
        ImageEntry(image_id=image_id, image=os.fspath(path), references=(), split=split)
        for image_id, path in zip(ids, paths, strict=True)
    ]
    report = extract_entries(
        encoder,
        entries,
        folder,
        dataset=dataset,
        split=split,
        batch_size=batch_size,
        num_workers=num_workers,
        grid=grid,
        progress=progress,
        max_pixels=max_pixels,
    )
    if not report.complete:
        raise RuntimeError(f"extraction into {folder} did not complete; run it again to finish")
    return FeatureCache.open(folder)


def write_summary(
    root: str | os.PathLike[str],
    reports: Sequence[ExtractionReport],
    dropped_empty_captions: dict[str, int] | None = None,
    annotation_notes: dict[str, dict[str, int]] | None = None,
) -> Path:
    """Records complete extractions in ``root/summary.json``, merging with the splits already there.

    Per split: ``dataset``, ``images``, ``extracted``, ``captions``, ``dropped_empty_captions`` (null when
    not given), ``skipped_count``, ``skipped`` (id, source, reason), ``grid``, and ``annotations``: what
    the corpus reader counted (``AnnotationSet.notes``: ``images_without_captions``,
    ``repeated_images``, ``lines_with_invalid_utf8``, ``images_not_downloaded``, ...; see docs/data.md).
    The summary describes the
    caches on disk, so reports with ``complete=False`` (a shard whose cache another process will
    assemble) are not recorded. The file is replaced atomically (temporary file + ``os.replace``) under a
    lock, so concurrent writers do not lose each other's splits.

    Args:
        root: the folder holding the split caches.
        reports: extraction reports.
        dropped_empty_captions: per split, captions the annotation reader dropped as empty.
        annotation_notes: per split, the reader's other counts.

    Returns:
        The path of ``summary.json``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / SUMMARY_FILE
    dropped = dropped_empty_captions or {}
    notes = annotation_notes or {}
    with _exclusive_lock(root / _SUMMARY_LOCK_FILE):
        summary: dict[str, Any] = {"splits": {}}
        if path.is_file():
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(loaded, dict) or not isinstance(loaded.get("splits"), dict):
                    raise ValueError("not a summary")
                summary = loaded
            except (ValueError, UnicodeDecodeError) as error:
                logger.warning("%s is unreadable (%s); writing a new one", path, error)
        for report in reports:
            if not report.complete:
                continue
            summary["splits"][report.split] = {
                "dataset": report.dataset,
                "images": report.images,
                "extracted": report.extracted,
                "captions": report.captions,
                "dropped_empty_captions": dropped.get(report.split),
                "skipped_count": len(report.skipped),
                "skipped": list(report.skipped),
                "grid": report.grid,
                "annotations": dict(sorted(notes.get(report.split, {}).items())),
            }
        summary["splits"] = dict(sorted(summary["splits"].items()))
        atomic_write_json(path, summary, indent=2)
    return path


# ------------------------------------------------------------------------------------------ reading


class _ChunkDataset(Dataset):
    """Item i: the preprocessed good images of chunk ``chunks[i]``, and the chunk's skipped images.

    Holds only picklable state (``(image_id, source)`` pairs, a frozen preprocessor), so it also works
    with the ``spawn`` start method; tar shards are opened lazily by :func:`load_image` in each worker.
    """

    def __init__(
        self,
        sources: list[tuple[str, str]],
        chunks: list[int],
        batch_size: int,
        preprocess: ImagePreprocessor,
        max_pixels: int | None,
    ) -> None:
        self.sources = sources
        self.chunks = chunks
        self.batch_size = batch_size
        self.preprocess = preprocess
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> dict[str, Any]:
        chunk = self.chunks[index]
        rows = self.sources[chunk * self.batch_size : (chunk + 1) * self.batch_size]
        pixels: list[np.ndarray] = []
        kept: list[str] = []
        kept_sources: list[str] = []
        skipped: list[dict[str, str]] = []
        for image_id, source in rows:
            try:
                pixels.append(self._read(source, image_id))
                kept.append(image_id)
                kept_sources.append(source)
            except ImageReadError as error:
                skipped.append({"image_id": image_id, "source": source, "reason": error.reason})
        size = self.preprocess.image_size
        stacked = (
            torch.from_numpy(np.stack(pixels))
            if pixels
            else torch.empty((0, 3, size, size), dtype=torch.float32)
        )
        return {
            "chunk": chunk,
            "pixels": stacked,
            "image_ids": kept,
            "sources": kept_sources,
            "skipped": skipped,
        }

    def _read(self, source: str, image_id: str) -> np.ndarray:
        image = load_image(source, image_id, max_pixels=self.max_pixels)
        if min(image.size) == 0:
            raise ImageReadError(source, image_id, "empty image (0 pixels)")
        # A 1x20000 strip would be resized to 224x4,480,000 before CLIP's crop; refuse it like a bomb.
        resized = self.preprocess.resized_pixels(image.width, image.height)
        if self.max_pixels is not None and resized > self.max_pixels:
            raise ImageReadError(
                source,
                image_id,
                f"extreme aspect ratio ({image.width}x{image.height} resizes to {resized} pixels)",
            )
        try:
            return self.preprocess.preprocess_image(image)
        except Exception as error:  # an image PIL decoded but preprocessing cannot handle is skipped too
            raise ImageReadError(
                source, image_id, f"preprocessing failed ({type(error).__name__}: {error})"
            ) from None


def _as_is(item: dict[str, Any]) -> dict[str, Any]:
    return item


# ------------------------------------------------------------------------------------------ chunks


def _manifest(
    encoder: ImageEncoder,
    ids: list[str],
    dataset: str,
    split: str,
    batch_size: int,
    grid: bool,
    grid_dtype: str,
    max_pixels: int | None,
) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "partial_format": PARTIAL_FORMAT,
        "dataset": dataset,
        "split": split,
        "batch_size": batch_size,
        "clip": encoder.fingerprint(),
        "clip_dtype": str(encoder.dtype).removeprefix("torch."),
        "autocast": _autocast_dtype(encoder.device),
        "preprocessing": encoder.preprocess.to_dict(),
        "grid": grid,
        "grid_dtype": grid_dtype if grid else None,
        "max_pixels": max_pixels,
        "image_ids": ids,
    }
    # The digest leaves out where the CLIP was loaded from: shards on machines that mount the same
    # weights at different paths must agree.
    compared = {
        **manifest,
        "clip": {key: value for key, value in manifest["clip"].items() if key not in INFORMATIONAL_CLIP_KEYS},
    }
    text = json.dumps(compared, sort_keys=True, separators=(",", ":"))
    manifest["digest"] = hashlib.sha256(text.encode()).hexdigest()
    return manifest


def _check_image_folders(entries: Sequence[ImageEntry], dataset: str, split: str) -> None:
    """Raises when a folder the entries' images should be in does not exist: a wrong ``image_dir`` would
    otherwise give a cache of zero images, each skipped as "file not found"."""
    folders: dict[str, int] = {}
    for entry in entries:
        folder = os.path.dirname(entry.image.split(SHARD_MEMBER_SEPARATOR, 1)[0]) or "."
        folders[folder] = folders.get(folder, 0) + 1
    for folder, count in folders.items():
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"{dataset}/{split}: the image folder {folder} does not exist ({count} of the split's "
                f"{len(entries)} images are expected in it); point the data's image_dir (or image_dirs) at "
                "the downloaded images"
            )


def _sources_on_disk(entries: Sequence[ImageEntry]) -> dict[str, Any]:
    """A digest of what each entry's image is on disk now (file name, size, modification time; for a shard
    member, its shard's), and how many of the images exist."""
    digest = hashlib.sha256()
    shard_stats: dict[str, str] = {}
    present = 0
    for entry in entries:
        path, separator, member = entry.image.partition(SHARD_MEMBER_SEPARATOR)
        if separator and path in shard_stats:
            state = shard_stats[path]
        else:
            try:
                stat = os.stat(path)
                state = f"{stat.st_size}:{stat.st_mtime_ns}"
            except OSError:
                state = "-"
            if separator:
                shard_stats[path] = state
        present += state != "-"
        # The file's name, not its folder: a data set moved or mounted elsewhere is the same images.
        name = os.path.basename(path) + separator + member
        digest.update(f"{entry.image_id}\t{name}\t{state}\n".encode())
    return {"digest": digest.hexdigest(), "present": present}


def _autocast_dtype(device: torch.device) -> str | None:
    """The autocast precision in force for ``device`` (``clipcap features --dtype``), or None: it changes
    the features, so it is part of the manifest."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return str(torch.get_autocast_dtype(device.type)).removeprefix("torch.")


def _prepare_partial(partial: Path, manifest: dict[str, Any]) -> None:
    """Keeps the partial folder if its manifest has the same digest, else starts it over (with a warning).

    Called with the partial folder's lock held.
    """
    path = partial / MANIFEST_FILE
    if path.is_file():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
            digest = existing.get("digest") if isinstance(existing, dict) else None
        except (ValueError, UnicodeDecodeError):
            digest = None
        if digest == manifest["digest"]:
            return
        logger.warning(
            "%s holds an unfinished extraction of something else (other images, CLIP, preprocessing, batch "
            "size or grid settings); starting it over",
            partial,
        )
    for child in partial.iterdir():
        if child.name == LOCK_FILE:
            continue
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    atomic_write_json(path, manifest)


def _chunk_file(partial: Path, chunk: int, kind: str) -> Path:
    """``chunk-<c>.<kind>``: ``features.npy``, ``grid.npy`` or ``json`` (the done marker)."""
    return partial / f"chunk-{chunk:06d}.{kind}"


def _done_chunks(partial: Path) -> set[int]:
    """Chunks whose JSON marker exists (their arrays are checked when the cache is assembled)."""
    done = set()
    for path in partial.glob("chunk-*.json"):
        number = path.name.removeprefix("chunk-").removesuffix(".json")
        if number.isdigit():
            done.add(int(number))
    return done


def _encode_and_save_chunk(
    encoder: ImageEncoder, partial: Path, digest: str, item: dict[str, Any], grid: bool, grid_dtype: str
) -> None:
    pixels = item["pixels"]
    grid_features = None
    with torch.no_grad():
        if pixels.shape[0] == 0:
            pooled = np.zeros((0, encoder.dim), dtype=np.float32)
            if grid:
                grid_features = np.zeros((0, encoder.grid_size, encoder.dim), dtype=grid_dtype)
        elif grid:
            pooled_tensor, grid_tensor = encoder.encode_images_and_grid(pixels)
            pooled = pooled_tensor.float().cpu().numpy()
            grid_features = grid_tensor.cpu().numpy().astype(grid_dtype, copy=False)
        else:
            pooled = encoder.encode_images(pixels).float().cpu().numpy()
    # An image whose features are not finite (an fp16 overflow, a broken encoder) is skipped and reported
    # like an unreadable one; the cache itself refuses non-finite values.
    finite = np.isfinite(pooled).all(axis=1)
    if grid_features is not None:
        finite &= np.isfinite(grid_features).reshape(len(grid_features), -1).all(axis=1)
    if not finite.all():
        bad = [image_id for image_id, ok in zip(item["image_ids"], finite.tolist(), strict=True) if not ok]
        sources = dict(zip(item["image_ids"], item["sources"], strict=True))
        reason = "non-finite features (NaN or inf)" + (f" in {grid_dtype} grid" if grid else "")
        item = {
            **item,
            "image_ids": [
                image_id for image_id, ok in zip(item["image_ids"], finite.tolist(), strict=True) if ok
            ],
            "skipped": [
                *item["skipped"],
                *({"image_id": i, "source": sources[i], "reason": reason} for i in bad),
            ],
        }
        pooled = pooled[finite]
        grid_features = grid_features[finite] if grid_features is not None else None
    chunk = item["chunk"]
    atomic_save_npy(_chunk_file(partial, chunk, "features.npy"), pooled)
    if grid_features is not None:
        atomic_save_npy(_chunk_file(partial, chunk, "grid.npy"), grid_features)
    # The marker comes last: a chunk without it is unfinished and is done again.
    marker = {"chunk": chunk, "digest": digest, "image_ids": item["image_ids"], "skipped": item["skipped"]}
    atomic_write_json(_chunk_file(partial, chunk, "json"), marker)


def _shard_outcome(partial: Path, chunks: list[int]) -> tuple[list[str], list[dict[str, str]]]:
    """Kept ids and skipped images of the given finished chunks (a shard's part, before assembly)."""
    kept: list[str] = []
    skipped: list[dict[str, str]] = []
    for chunk in chunks:
        try:
            info = json.loads(_chunk_file(partial, chunk, "json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        kept.extend(info.get("image_ids", []))
        skipped.extend(info.get("skipped", []))
    return kept, skipped


def _assemble_or_find(
    folder: Path,
    partial: Path,
    manifest: dict[str, Any],
    on_disk: dict[str, Any],
    encoder: ImageEncoder,
    chunk_count: int,
    grid: bool,
    grid_dtype: str,
) -> FeatureCache | None:
    """Assembles the cache from the chunks, or finds it assembled by another shard; None if chunks are bad.

    Called with the partial folder's lock held.
    """
    manifest_path = partial / MANIFEST_FILE
    if not manifest_path.is_file():
        # Another shard assembled the cache and removed the partial folder while this one waited for the
        # lock (taking the lock re-created the folder, empty).
        shutil.rmtree(partial, ignore_errors=True)
        if not FeatureCache.exists(folder):
            logger.warning("%s vanished before the cache %s was assembled", partial, folder)
            return None
        cache = FeatureCache.open(
            folder, expect=cache_expectation(encoder, manifest["dataset"], manifest["split"])
        )
        if cache.meta.get("extraction_digest") != manifest["digest"]:
            logger.warning("%s was assembled from another extraction than this one", folder)
            return None
        return cache
    try:
        current = json.loads(manifest_path.read_text(encoding="utf-8")).get("digest")
    except (ValueError, UnicodeDecodeError, AttributeError):
        current = None
    if current != manifest["digest"]:
        logger.warning("%s was started over by another extraction; this one's chunks are gone", partial)
        return None

    batch_size = manifest["batch_size"]
    ids = manifest["image_ids"]
    dim, grid_rows = encoder.dim, encoder.grid_size
    kept: list[str] = []
    skipped: list[dict[str, str]] = []
    feature_blocks: list[np.ndarray] = []
    grid_blocks: list[np.ndarray] = []
    broken: list[int] = []
    for chunk in range(chunk_count):
        expected_ids = ids[chunk * batch_size : (chunk + 1) * batch_size]
        try:
            info = json.loads(_chunk_file(partial, chunk, "json").read_text(encoding="utf-8"))
            chunk_kept, chunk_skipped = info["image_ids"], info["skipped"]
            if info["digest"] != manifest["digest"] or info["chunk"] != chunk:
                raise ValueError("marker of another extraction")
            if sorted(chunk_kept + [item["image_id"] for item in chunk_skipped]) != sorted(expected_ids):
                raise ValueError("image ids differ from the manifest's")
            features = np.load(_chunk_file(partial, chunk, "features.npy"), mmap_mode="r", allow_pickle=False)
            if features.shape != (len(chunk_kept), dim) or features.dtype != np.float32:
                raise ValueError(f"features of shape {features.shape} and type {features.dtype}")
            if grid:
                grid_block = np.load(
                    _chunk_file(partial, chunk, "grid.npy"), mmap_mode="r", allow_pickle=False
                )
                if grid_block.shape != (len(chunk_kept), grid_rows, dim) or grid_block.dtype != np.dtype(
                    grid_dtype
                ):
                    raise ValueError(f"grid of shape {grid_block.shape} and type {grid_block.dtype}")
                grid_blocks.append(grid_block)
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("%s: chunk %d is unusable (%s); it will be recomputed", partial, chunk, error)
            broken.append(chunk)
            continue
        position = {image_id: row for row, image_id in enumerate(expected_ids)}
        if [position[image_id] for image_id in chunk_kept] != sorted(
            position[image_id] for image_id in chunk_kept
        ):
            broken.append(chunk)
            continue
        kept.extend(chunk_kept)
        skipped.extend(chunk_skipped)
        feature_blocks.append(features)
    if broken:
        for chunk in broken:
            _chunk_file(partial, chunk, "json").unlink(missing_ok=True)
        logger.warning("%s: %d chunks must be recomputed; run the extraction again", partial, len(broken))
        return None

    meta = {
        "clip": encoder.fingerprint(),
        "preprocessing": encoder.preprocess.to_dict(),
        "dataset": manifest["dataset"],
        "split": manifest["split"],
        "clipcap_version": clipcap.__version__,
        "images": len(ids),
        "skipped": skipped,
        "extraction_digest": manifest["digest"],
        "sources_digest": on_disk["digest"],
        "sources_present": on_disk["present"],
    }
    cache = FeatureCache.write(
        folder,
        kept,
        RowBlocks(feature_blocks, (dim,)),
        meta,
        grid=RowBlocks(grid_blocks, (grid_rows, dim)) if grid else None,
        grid_dtype=grid_dtype,
    )
    del feature_blocks, grid_blocks
    shutil.rmtree(partial, ignore_errors=True)
    return cache


# ------------------------------------------------------------------------------------------ locks


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive ``fcntl.flock`` on ``path`` (created if needed) for the block.

    If the file is deleted and re-created while this process waits (the partial folder is removed after
    assembly), the lock taken would be on a file nobody else sees, so it is taken again on the new one.
    """
    import fcntl  # POSIX only; imported here so that the module imports everywhere

    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            handle = open(path, "a")  # noqa: SIM115 -- closed below or when the block ends
        except FileNotFoundError:  # the folder vanished between mkdir and open
            continue
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                same_file = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same_file = False
        except BaseException:
            handle.close()
            raise
        if same_file:
            break
        handle.close()
    try:
        yield
    finally:
        handle.close()  # releases the lock


def _partial_lock(partial: Path) -> Any:
    return _exclusive_lock(partial / LOCK_FILE)
