"""On-disk cache of frozen-CLIP image features, memory-mapped and pickle-free.

A cache is a folder of three files, and optionally a fourth:

- ``features.npy``: (N, D) float32 pooled embeddings, loaded with ``np.load(mmap_mode="r",
  allow_pickle=False)`` so that opening it neither reads every row into memory nor runs code from the file;
- ``image_ids.json``: the N image ids (strings), row i belongs to ``image_ids[i]``;
- ``meta.json``: what made the features (CLIP fingerprint, preprocessing, dataset, split) plus ``dim``,
  ``count``, ``format_version``, ``grid_shape`` (``[G, D]`` or null) and ``grid_dtype``;
- ``grid_features.npy`` (only when ``grid_shape`` is set): (N, G, D) float32 or float16 patch-token
  features in the same D-dim space, memory-mapped the same way.

Caches written before grid features existed have no ``grid_shape`` and still open (same format version):
they simply have no grid.

Features are only valid for the CLIP and preprocessing that produced them, so :meth:`FeatureCache.open`
compares the recorded ones with what the caller expects and refuses a mismatch.

Legend for shapes: N = number of images, D = CLIP embedding size, G = grid tokens (image patches).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from clipcap.files import replace_folder

FORMAT_VERSION = 1
FEATURES_FILE = "features.npy"
IMAGE_IDS_FILE = "image_ids.json"
META_FILE = "meta.json"
GRID_FILE = "grid_features.npy"
GRID_DTYPES = ("float32", "float16")
"""Storage types of grid features: float32 by default; float16 halves a cache that is G times larger than
the pooled one (50x for ViT-B/32)."""

_WRITE_BLOCK_BYTES = 64 * 2**20  # rows are streamed to disk in pieces of about this size

INFORMATIONAL_CLIP_KEYS = frozenset({"name", "path"})
"""Fingerprint keys recorded for people, not compared: the same weights may be reached under another
name or folder (``synthetic:clip`` vs the folder it resolves to), and the weight hash and config sizes
already identify the model."""


class CacheableEncoder(Protocol):
    """What :func:`cache_expectation` reads of an image encoder (any
    :class:`~clipcap.features.encoders.ImageEncoder` has it)."""

    preprocess: Any

    def fingerprint(self) -> dict[str, Any]: ...


def cache_expectation(
    encoder: CacheableEncoder, dataset: str | None = None, split: str | None = None
) -> dict[str, Any]:
    """What a feature cache must record to be usable with ``encoder``, for ``FeatureCache.open(expect=)``.

    Args:
        encoder: the CLIP the features will be used with.
        dataset: dataset name to require, or None to accept any.
        split: split to require, or None to accept any.
    """
    expect: dict[str, Any] = {"clip": encoder.fingerprint(), "preprocessing": encoder.preprocess.to_dict()}
    if dataset is not None:
        expect["dataset"] = dataset
    if split is not None:
        expect["split"] = split
    return expect


class FeatureCacheError(ValueError):
    """A feature cache's files are malformed or inconsistent with one another."""


class FeatureCacheMismatch(ValueError):
    """A feature cache was made with another CLIP, preprocessing, dataset or split than expected.

    Attributes:
        mismatches: ``(field, cached_value, expected_value)`` for every differing field.
    """

    def __init__(self, message: str, mismatches: list[tuple[str, Any, Any]]) -> None:
        super().__init__(message)
        self.mismatches = mismatches


def validate_image_ids(image_ids: Sequence[str], source: str = "image_ids") -> list[str]:
    """Checks that image ids are unique strings and returns them as a list.

    Args:
        image_ids: the ids.
        source: what they came from, for error messages.

    Raises:
        TypeError: an id is not a string (JSON would keep ``123`` and ``"123"`` apart).
        ValueError: ids repeat.
    """
    ids = list(image_ids)
    for index, image_id in enumerate(ids):
        if not isinstance(image_id, str):
            raise TypeError(
                f"{source}: image ids must be strings, got {type(image_id).__name__} {image_id!r} at "
                f"position {index}"
            )
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        duplicates = []
        for image_id in ids:
            if image_id in seen and image_id not in duplicates:
                duplicates.append(image_id)
            seen.add(image_id)
        shown = ", ".join(repr(image_id) for image_id in duplicates[:5])
        more = f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else ""
        raise ValueError(f"{source}: duplicate image ids {shown}{more}")
    return ids


class RowBlocks:
    """An (N, ...) array given as consecutive blocks of rows, written by :meth:`FeatureCache.write` one
    block after another instead of being concatenated in memory (extraction assembles a cache from
    memory-mapped chunks this way; grid features of a large corpus do not fit in memory).

    Args:
        blocks: arrays with the same trailing shape, in row order.
        row_shape: the shape of one row (``(D,)``, ``(G, D)``), needed when there are no rows.
    """

    def __init__(self, blocks: Sequence[np.ndarray], row_shape: Sequence[int]) -> None:
        self.blocks = list(blocks)
        self.row_shape = tuple(int(size) for size in row_shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(int(block.shape[0]) for block in self.blocks), *self.row_shape)


class FeatureCache:
    """A memory-mapped (N, D) feature matrix with its image ids and provenance, and optional grid features.

    Create one with :meth:`write` or :meth:`open`, not the constructor.

    Attributes:
        folder: the cache folder.
        features: (N, D) float32 read-only memmap.
        image_ids: the N image ids; row i of ``features`` belongs to ``image_ids[i]``.
        meta: the contents of ``meta.json``.
        grid: (N, G, D) float32 or float16 read-only memmap of grid features, or None.
    """

    def __init__(
        self,
        folder: Path,
        features: np.ndarray,
        image_ids: list[str],
        meta: dict[str, Any],
        grid: np.ndarray | None = None,
    ) -> None:
        self.folder = folder
        self.features = features
        self.image_ids = image_ids
        self.meta = meta
        self.grid = grid
        self._index = {image_id: row for row, image_id in enumerate(image_ids)}

    @property
    def dim(self) -> int:
        """D, the feature size."""
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return len(self.image_ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._index

    @property
    def grid_shape(self) -> tuple[int, int] | None:
        """(G, D) of the grid features, or None if the cache has none."""
        return None if self.grid is None else (int(self.grid.shape[1]), int(self.grid.shape[2]))

    def __repr__(self) -> str:
        grid = "" if self.grid is None else f", grid_shape={self.grid_shape}"
        return f"FeatureCache({str(self.folder)!r}, count={len(self)}, dim={self.dim}{grid})"

    def index_of(self, image_id: str) -> int:
        """Row of ``image_id`` in :attr:`features`.

        Raises:
            KeyError: the image is not in the cache.
        """
        try:
            return self._index[image_id]
        except KeyError:
            raise KeyError(f"image id {image_id!r} is not in the feature cache {self.folder}") from None

    def get(self, image_id: str) -> np.ndarray:
        """The (D,) float32 feature of one image, copied out of the memmap."""
        return np.array(self.features[self.index_of(image_id)])

    def get_grid(self, image_id: str) -> np.ndarray:
        """The (G, D) grid features of one image as float32, copied out of the memmap.

        Raises:
            KeyError: the image is not in the cache.
            ValueError: the cache has no grid features.
        """
        if self.grid is None:
            raise ValueError(
                f"feature cache {self.folder} has no grid features; re-extract it with grid features "
                "(`clipcap features --grid`)"
            )
        row = self.index_of(image_id)
        features = np.array(self.grid[row], dtype=np.float32)
        if not np.isfinite(features).all():
            raise FeatureCacheError(
                f"{self.folder / GRID_FILE}: row {row} (image {image_id!r}) holds a non-finite value (NaN or "
                "inf); re-extract the features"
            )
        return features

    @staticmethod
    def exists(folder: str | os.PathLike[str]) -> bool:
        """Whether ``folder`` holds all three cache files (it may still fail validation)."""
        folder = Path(folder)
        return all((folder / name).is_file() for name in (FEATURES_FILE, IMAGE_IDS_FILE, META_FILE))

    @classmethod
    def check_replaceable(cls, folder: str | os.PathLike[str]) -> None:
        """Raises ``FileExistsError`` unless :meth:`write` may write ``folder``: it is absent, empty or a
        cache. (Extraction checks this before hours of work rather than at the end.)"""
        folder = Path(folder)
        if folder.exists() and not (folder.is_dir() and (not any(folder.iterdir()) or cls.exists(folder))):
            raise FileExistsError(f"{folder} exists and is not a feature cache; refusing to replace it")

    @classmethod
    def write(
        cls,
        folder: str | os.PathLike[str],
        image_ids: Sequence[str],
        features: np.ndarray | RowBlocks,
        meta: dict[str, Any],
        grid: np.ndarray | RowBlocks | None = None,
        grid_dtype: str = "float32",
    ) -> FeatureCache:
        """Writes a cache atomically and opens it.

        The files are written into a temporary sibling folder, which is then renamed to ``folder``, so a
        crash or error never leaves a half-written cache under the final name. An existing cache is moved
        aside only once the new one is complete, and deleted after the rename; if the process dies between
        the two renames the old cache survives as ``.<name>.old-*`` beside it.

        Args:
            folder: the cache folder; its parents are created.
            image_ids: N unique string ids.
            features: (N, D) features, stored as float32; an array, or :class:`RowBlocks` to stream.
            meta: JSON-serialisable provenance (``clip``, ``preprocessing``, ``dataset``, ``split``, ...);
                ``dim``, ``count``, ``format_version``, ``grid_shape`` and ``grid_dtype`` are added.
            grid: optional (N, G, D) grid features (same D as ``features``), an array or :class:`RowBlocks`.
            grid_dtype: how grid features are stored, ``float32`` or ``float16``.

        Returns:
            The new cache, opened.

        Raises:
            FileExistsError: ``folder`` exists, is not empty and is not a feature cache (never replaced).
        """
        folder = Path(folder)
        ids = validate_image_ids(image_ids)
        feature_shape, feature_blocks = _row_blocks(features, "features", "(N, D)")
        if feature_shape[0] != len(ids):
            raise ValueError(f"{len(ids)} image ids but {feature_shape[0]} feature rows")
        dim = feature_shape[1]
        grid_shape: list[int] | None = None
        grid_blocks: list[np.ndarray] = []
        if grid is not None:
            if grid_dtype not in GRID_DTYPES:
                raise ValueError(f"grid_dtype must be one of {GRID_DTYPES}, got {grid_dtype!r}")
            full_grid_shape, grid_blocks = _row_blocks(grid, "grid", "(N, G, D)")
            if full_grid_shape[0] != len(ids):
                raise ValueError(f"{len(ids)} image ids but {full_grid_shape[0]} grid rows")
            if full_grid_shape[2] != dim:
                raise ValueError(
                    f"grid features have size {full_grid_shape[2]} but the pooled features {dim}; both must "
                    "be in the same projected space"
                )
            grid_shape = [full_grid_shape[1], full_grid_shape[2]]
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        full_meta = {
            **meta,
            "dim": dim,
            "count": len(ids),
            "format_version": FORMAT_VERSION,
            "grid_shape": grid_shape,
            "grid_dtype": grid_dtype if grid is not None else None,
        }
        _refuse_non_finite(
            feature_blocks, ids, f"feature cache {folder}: {FEATURES_FILE}", "nothing was written"
        )
        if grid is not None:
            _refuse_non_finite(
                grid_blocks, ids, f"feature cache {folder}: {GRID_FILE}", "nothing was written"
            )
        # Serialise before touching the disk so unserialisable meta fails without leftovers.
        meta_text = json.dumps(full_meta, indent=2, sort_keys=True, allow_nan=False) + "\n"
        ids_text = json.dumps(ids) + "\n"

        cls.check_replaceable(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            _save_rows(staging / FEATURES_FILE, feature_shape, feature_blocks, np.dtype(np.float32))
            if grid is not None:
                _save_rows(staging / GRID_FILE, full_grid_shape, grid_blocks, np.dtype(grid_dtype))
            _write_text(staging / IMAGE_IDS_FILE, ids_text)
            _write_text(staging / META_FILE, meta_text)
            replace_folder(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return cls.open(folder)

    @classmethod
    def open(cls, folder: str | os.PathLike[str], expect: dict[str, Any] | None = None) -> FeatureCache:
        """Opens and validates a cache, optionally checking that it matches what the caller needs.

        Args:
            folder: the cache folder.
            expect: what the features must have been made with, typically from
                ``clipcap.features.cache_expectation``: ``clip`` (an encoder fingerprint),
                ``preprocessing`` (a preprocessor's ``to_dict()``), and optionally ``dataset`` and
                ``split``. Missing or None entries are not checked.

        Raises:
            FileNotFoundError: the folder or one of its files is missing.
            FeatureCacheError: a file is malformed, or the files disagree with each other.
            FeatureCacheMismatch: the cache does not match ``expect``.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"feature cache {folder} does not exist (extract the features first)")
        for name in (FEATURES_FILE, IMAGE_IDS_FILE, META_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"feature cache {folder}: {name} is missing; the cache is incomplete, re-extract it"
                )

        meta = _read_json(folder / META_FILE)
        if not isinstance(meta, dict):
            raise FeatureCacheError(
                f"{folder / META_FILE}: expected a JSON object, got {type(meta).__name__}"
            )
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise FeatureCacheError(
                f"{folder / META_FILE}: format_version is {version!r}, this clipcap reads {FORMAT_VERSION}; "
                "re-extract the features"
            )

        image_ids = _read_json(folder / IMAGE_IDS_FILE)
        if not isinstance(image_ids, list):
            raise FeatureCacheError(
                f"{folder / IMAGE_IDS_FILE}: expected a JSON list of ids, got {type(image_ids).__name__}"
            )
        try:
            image_ids = validate_image_ids(image_ids, source=str(folder / IMAGE_IDS_FILE))
        except (TypeError, ValueError) as error:
            raise FeatureCacheError(str(error)) from None

        features_path = folder / FEATURES_FILE
        try:
            features = np.load(features_path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise FeatureCacheError(f"{features_path}: not a readable .npy array ({error})") from error
        if features.ndim != 2:
            raise FeatureCacheError(
                f"{features_path}: expected a 2-D (N, D) array, got shape {features.shape}"
            )
        if features.dtype != np.float32:
            raise FeatureCacheError(f"{features_path}: expected float32, got {features.dtype}")
        if features.shape[0] != len(image_ids):
            raise FeatureCacheError(
                f"feature cache {folder}: {FEATURES_FILE} has {features.shape[0]} rows but "
                f"{IMAGE_IDS_FILE} has {len(image_ids)} ids"
            )
        for key, actual in (("count", features.shape[0]), ("dim", features.shape[1])):
            if meta.get(key) != actual:
                raise FeatureCacheError(
                    f"{folder / META_FILE}: {key} is {meta.get(key)!r} but {FEATURES_FILE} has {actual}"
                )

        # The pooled features are read in full once (a few hundred MB for COCO); grid rows, which can be
        # tens of GB, are checked as they are read (get_grid).
        _refuse_non_finite([features], image_ids, str(features_path), "re-extract the features")
        grid = _open_grid(folder, meta, len(image_ids), int(features.shape[1]))
        cache = cls(folder, features, image_ids, meta, grid=grid)
        if expect is not None:
            cache.check(expect)
        return cache

    def check(self, expect: dict[str, Any]) -> None:
        """Raises :class:`FeatureCacheMismatch` unless the cache was made as ``expect`` says.

        See :meth:`open` for the keys of ``expect``. All differing fields are reported together.
        """
        mismatches: list[tuple[str, Any, Any]] = []
        for section in ("clip", "preprocessing"):
            expected = expect.get(section)
            if expected is None:
                continue
            cached = self.meta.get(section)
            if not isinstance(cached, dict):
                mismatches.append((section, cached, expected))
                continue
            skip = INFORMATIONAL_CLIP_KEYS if section == "clip" else frozenset()
            for key in sorted((set(expected) | set(cached)) - skip):
                if cached.get(key, _MISSING) != expected.get(key, _MISSING):
                    mismatches.append(
                        (f"{section}.{key}", cached.get(key, _MISSING), expected.get(key, _MISSING))
                    )
        for key in ("dataset", "split"):
            if expect.get(key) is not None and self.meta.get(key) != expect[key]:
                mismatches.append((key, self.meta.get(key, _MISSING), expect[key]))
        if mismatches:
            lines = [
                f"  {field}: cached {cached!r}, expected {expected!r}"
                for field, cached, expected in mismatches
            ]
            raise FeatureCacheMismatch(
                f"feature cache {self.folder} does not match what is expected:\n"
                + "\n".join(lines)
                + "\nRe-extract the features with the current CLIP and preprocessing (`clipcap features ...`) "
                "or point to a cache made with them.",
                mismatches,
            )


class _Missing:
    """Marks a field absent from one side of a comparison (distinct from a recorded None)."""

    def __repr__(self) -> str:
        return "<not recorded>"


_MISSING = _Missing()


def _open_grid(folder: Path, meta: dict[str, Any], count: int, dim: int) -> np.ndarray | None:
    """Opens and validates ``grid_features.npy`` against ``meta.json``; None when the cache has no grid."""
    grid_path = folder / GRID_FILE
    grid_shape = meta.get("grid_shape")
    if grid_shape is None:
        if grid_path.exists():
            raise FeatureCacheError(
                f"{grid_path}: present, but {folder / META_FILE} records no grid_shape; re-extract the features"
            )
        return None
    if (
        not isinstance(grid_shape, list)
        or len(grid_shape) != 2
        or not all(isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in grid_shape)
    ):
        raise FeatureCacheError(
            f"{folder / META_FILE}: grid_shape must be [G, D] or null, got {grid_shape!r}"
        )
    if grid_shape[1] != dim:
        raise FeatureCacheError(
            f"{folder / META_FILE}: grid_shape {grid_shape} has D={grid_shape[1]} but {FEATURES_FILE} has {dim}"
        )
    grid_dtype = meta.get("grid_dtype", "float32")
    if grid_dtype not in GRID_DTYPES:
        raise FeatureCacheError(
            f"{folder / META_FILE}: grid_dtype must be one of {GRID_DTYPES}, got {grid_dtype!r}"
        )
    if not grid_path.is_file():
        raise FileNotFoundError(
            f"feature cache {folder}: {GRID_FILE} is missing though {META_FILE} records grid_shape; the cache "
            "is incomplete, re-extract it"
        )
    try:
        grid = np.load(grid_path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise FeatureCacheError(f"{grid_path}: not a readable .npy array ({error})") from error
    expected = (count, grid_shape[0], grid_shape[1])
    if grid.shape != expected:
        raise FeatureCacheError(
            f"{grid_path}: shape {grid.shape}, expected {expected} (count from {IMAGE_IDS_FILE}, [G, D] from "
            f"{META_FILE})"
        )
    if grid.dtype != np.dtype(grid_dtype):
        raise FeatureCacheError(
            f"{grid_path}: expected {grid_dtype} (meta.json grid_dtype), got {grid.dtype}"
        )
    return grid


_CHECK_BLOCK_BYTES = 64 * 2**20


def _refuse_non_finite(
    blocks: Sequence[np.ndarray], image_ids: Sequence[str], where: str, advice: str
) -> None:
    """Raises :class:`FeatureCacheError` naming the first row (and its image id) that holds a NaN or inf.
    Reads the rows in bounded blocks, so memory-mapped arrays are never loaded whole."""
    offset = 0
    for block in blocks:
        row_bytes = max(1, int(np.prod(block.shape[1:], dtype=np.int64)) * block.dtype.itemsize)
        step = max(1, _CHECK_BLOCK_BYTES // row_bytes)
        for start in range(0, block.shape[0], step):
            part = np.asarray(block[start : start + step])
            finite = np.isfinite(part).reshape(part.shape[0], -1).all(axis=1)
            if not finite.all():
                row = offset + start + int(np.argmin(finite))
                image = f" (image {image_ids[row]!r})" if row < len(image_ids) else ""
                raise FeatureCacheError(
                    f"{where}: row {row}{image} holds a non-finite value (NaN or inf); {advice}"
                )
        offset += block.shape[0]


def _row_blocks(
    rows: np.ndarray | RowBlocks, name: str, layout: str
) -> tuple[tuple[int, ...], list[np.ndarray]]:
    """Validates an array or :class:`RowBlocks` with ``layout``'s number of axes; returns (shape, blocks)."""
    ndim = layout.count(",") + 1
    if isinstance(rows, RowBlocks):
        blocks = [np.asarray(block) for block in rows.blocks]
        row_shape = rows.row_shape
        for block in blocks:
            if block.ndim != ndim or tuple(block.shape[1:]) != row_shape:
                raise ValueError(
                    f"{name}: a block has shape {block.shape}, expected rows of shape {row_shape}"
                )
    else:
        array = np.asarray(rows)
        if array.ndim != ndim:
            raise ValueError(f"{name} must be a {ndim}-D {layout} array, got shape {array.shape}")
        blocks, row_shape = [array], tuple(int(size) for size in array.shape[1:])
    for block in blocks:
        if not np.issubdtype(block.dtype, np.floating):
            raise TypeError(f"{name} must be floating point, got {block.dtype}")
    count = sum(int(block.shape[0]) for block in blocks)
    return (count, *row_shape), blocks


def _save_rows(path: Path, shape: tuple[int, ...], blocks: Sequence[np.ndarray], dtype: np.dtype) -> None:
    """Writes a ``.npy`` file (the bytes ``np.save`` writes) block by block, in bounded memory."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
    step = max(1, _WRITE_BLOCK_BYTES // row_bytes)
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        for block in blocks:
            for start in range(0, block.shape[0], step):
                handle.write(np.ascontiguousarray(block[start : start + step], dtype=dtype).tobytes())
        _flush(handle)


def _flush(handle: Any) -> None:
    # fsync before the rename: otherwise a power cut right after it could expose an empty file under
    # the final name, which is exactly what the atomic rename is meant to prevent.
    handle.flush()
    os.fsync(handle.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        _flush(handle)


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FeatureCacheError(f"{path}: not valid JSON ({error})") from error
