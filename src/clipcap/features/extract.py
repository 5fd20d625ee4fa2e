"""Extraction of frozen-CLIP image features into a :class:`~clipcap.features.cache.FeatureCache`.

Legend for shapes: N = number of images, D = CLIP embedding size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

import clipcap
from clipcap.clip.encoder import ClipEncoder
from clipcap.features.cache import FeatureCache, validate_image_ids


class ImageReadError(OSError):
    """An image file is missing or cannot be decoded.

    Attributes:
        path: the file.
        image_id: the id of the image it should hold.
    """

    def __init__(self, path: str | os.PathLike[str], image_id: str, reason: str) -> None:
        super().__init__(f"cannot read image {image_id!r} from {path}: {reason}")
        self.path = Path(path)
        self.image_id = image_id


def load_image(path: str | os.PathLike[str], image_id: str) -> Image.Image:
    """Opens and fully decodes an image file.

    Decoding happens here (``Image.load``) rather than lazily inside preprocessing so that a truncated
    or corrupt file is reported with its path and image id.

    Raises:
        ImageReadError: the file is missing, not an image, or corrupt.
    """
    try:
        # Leaving the block closes only the file; the decoded pixels stay usable.
        with Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError:
        raise ImageReadError(path, image_id, "file not found") from None
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ImageReadError(path, image_id, f"{type(error).__name__}: {error}") from error


def cache_expectation(
    encoder: ClipEncoder, dataset: str | None = None, split: str | None = None
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


def extract_features(
    encoder: ClipEncoder,
    image_paths: Sequence[str | os.PathLike[str]],
    image_ids: Sequence[str],
    folder: str | os.PathLike[str],
    dataset: str,
    split: str,
    batch_size: int = 64,
    progress: bool = True,
) -> FeatureCache:
    """Encodes images with a frozen CLIP and writes their features as a cache.

    Images are read and preprocessed in batches of ``batch_size``; the (N, D) float32 features are
    written only when all images are done, atomically, so an interrupted run leaves no cache behind.

    Args:
        encoder: the CLIP image encoder.
        image_paths: N image files.
        image_ids: N unique ids, in the same order.
        folder: the cache folder (an existing cache there is replaced).
        dataset: dataset name recorded in the cache.
        split: split recorded in the cache.
        batch_size: images per forward pass.
        progress: show a progress bar.

    Returns:
        The written cache.

    Raises:
        ImageReadError: an image is missing or unreadable (its path and id are in the message).
    """
    ids = validate_image_ids(image_ids)
    paths = list(image_paths)
    if len(paths) != len(ids):
        raise ValueError(f"{len(paths)} image paths but {len(ids)} image ids")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")

    features = np.empty((len(ids), encoder.dim), dtype=np.float32)
    with tqdm(
        total=len(ids), disable=not progress, unit="img", desc=f"CLIP features {dataset}/{split}"
    ) as bar:
        for start in range(0, len(ids), batch_size):
            stop = min(start + batch_size, len(ids))
            images = [load_image(paths[row], ids[row]) for row in range(start, stop)]
            with torch.no_grad():
                embeddings = encoder.encode_images(encoder.preprocess(images))
            features[start:stop] = embeddings.float().cpu().numpy()
            bar.update(stop - start)

    meta = {
        "clip": encoder.fingerprint(),
        "preprocessing": encoder.preprocess.to_dict(),
        "dataset": dataset,
        "split": split,
        "clipcap_version": clipcap.__version__,
    }
    return FeatureCache.write(folder, ids, features, meta)
