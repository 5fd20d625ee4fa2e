"""On-disk cache of frozen-CLIP image features, memory-mapped and pickle-free.

A cache is a folder of three files:

- ``features.npy``: (N, D) float32, loaded with ``np.load(mmap_mode="r", allow_pickle=False)`` so that
  opening it neither reads every row into memory nor runs code from the file;
- ``image_ids.json``: the N image ids (strings), row i belongs to ``image_ids[i]``;
- ``meta.json``: what made the features (CLIP fingerprint, preprocessing, dataset, split) plus ``dim``,
  ``count`` and ``format_version``.

Features are only valid for the CLIP and preprocessing that produced them, so :meth:`FeatureCache.open`
compares the recorded ones with what the caller expects and refuses a mismatch.

Legend for shapes: N = number of images, D = CLIP embedding size.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
FEATURES_FILE = "features.npy"
IMAGE_IDS_FILE = "image_ids.json"
META_FILE = "meta.json"

INFORMATIONAL_CLIP_KEYS = frozenset({"name", "path"})
"""Fingerprint keys recorded for people, not compared: the same weights may be reached under another
name or folder (``synthetic:clip`` vs the folder it resolves to), and the weight hash and config sizes
already identify the model."""


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


class FeatureCache:
    """A memory-mapped (N, D) feature matrix with its image ids and provenance.

    Create one with :meth:`write` or :meth:`open`, not the constructor.

    Attributes:
        folder: the cache folder.
        features: (N, D) float32 read-only memmap.
        image_ids: the N image ids; row i of ``features`` belongs to ``image_ids[i]``.
        meta: the contents of ``meta.json``.
    """

    def __init__(
        self, folder: Path, features: np.ndarray, image_ids: list[str], meta: dict[str, Any]
    ) -> None:
        self.folder = folder
        self.features = features
        self.image_ids = image_ids
        self.meta = meta
        self._index = {image_id: row for row, image_id in enumerate(image_ids)}

    @property
    def dim(self) -> int:
        """D, the feature size."""
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return len(self.image_ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._index

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.folder)!r}, count={len(self)}, dim={self.dim})"

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

    @staticmethod
    def exists(folder: str | os.PathLike[str]) -> bool:
        """Whether ``folder`` holds all three cache files (it may still fail validation)."""
        folder = Path(folder)
        return all((folder / name).is_file() for name in (FEATURES_FILE, IMAGE_IDS_FILE, META_FILE))

    @classmethod
    def write(
        cls,
        folder: str | os.PathLike[str],
        image_ids: Sequence[str],
        features: np.ndarray,
        meta: dict[str, Any],
    ) -> FeatureCache:
        """Writes a cache atomically and opens it.

        The files are written into a temporary sibling folder, which is then renamed to ``folder``, so a
        crash or error never leaves a half-written cache under the final name. An existing cache is moved
        aside only once the new one is complete, and deleted after the rename; if the process dies between
        the two renames the old cache survives as ``.<name>.old-*`` beside it.

        Args:
            folder: the cache folder; its parents are created.
            image_ids: N unique string ids.
            features: (N, D) features, stored as float32.
            meta: JSON-serialisable provenance (``clip``, ``preprocessing``, ``dataset``, ``split``, ...);
                ``dim``, ``count`` and ``format_version`` are added.

        Returns:
            The new cache, opened.

        Raises:
            FileExistsError: ``folder`` exists, is not empty and is not a feature cache (never replaced).
        """
        folder = Path(folder)
        ids = validate_image_ids(image_ids)
        array = np.asarray(features)
        if array.ndim != 2:
            raise ValueError(f"features must be a 2-D (N, D) array, got shape {array.shape}")
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"features must be floating point, got {array.dtype}")
        if array.shape[0] != len(ids):
            raise ValueError(f"{len(ids)} image ids but {array.shape[0]} feature rows")
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        full_meta = {
            **meta,
            "dim": int(array.shape[1]),
            "count": len(ids),
            "format_version": FORMAT_VERSION,
        }
        # Serialise before touching the disk so unserialisable meta fails without leftovers.
        meta_text = json.dumps(full_meta, indent=2, sort_keys=True, allow_nan=False) + "\n"
        ids_text = json.dumps(ids) + "\n"

        if folder.exists() and not (folder.is_dir() and (not any(folder.iterdir()) or cls.exists(folder))):
            raise FileExistsError(f"{folder} exists and is not a feature cache; refusing to replace it")
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            with open(staging / FEATURES_FILE, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
                _flush(handle)
            _write_text(staging / IMAGE_IDS_FILE, ids_text)
            _write_text(staging / META_FILE, meta_text)
            _swap_into_place(staging, folder)
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

        cache = cls(folder, features, image_ids, meta)
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


def _flush(handle: Any) -> None:
    # fsync before the rename: otherwise a power cut right after it could expose an empty file under
    # the final name, which is exactly what the atomic rename is meant to prevent.
    handle.flush()
    os.fsync(handle.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        _flush(handle)


def _swap_into_place(staging: Path, folder: Path) -> None:
    """Renames the complete ``staging`` folder to ``folder``, replacing an existing cache there."""
    if not folder.exists():
        os.rename(staging, folder)
        return
    # os.rename cannot replace a non-empty directory, so the old cache steps aside first and comes back
    # if the second rename fails.
    retired = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(folder, retired)
    try:
        os.rename(staging, folder)
    except BaseException:
        os.rename(retired, folder)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FeatureCacheError(f"{path}: not valid JSON ({error})") from error
