"""Supervision control: how many images keep their captions, and which are left as an unlabelled pool.

This follows the supervision control of Jin (2023): stage 1 trains on a small labelled subset (e.g. 10,000
COCO training images with their references), stage 2 on the unlabelled pool of the remaining images, whose
captions are never seen. Both are plain functions over :class:`~clipcap.data.records.ImageEntry` lists, so
the same subset can be rebuilt anywhere from the split, the size and the seed.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable, Sequence

from clipcap.data.records import ImageEntry


def labelled_subset(entries: Sequence[ImageEntry], num_images: int, seed: int = 0) -> list[ImageEntry]:
    """Chooses ``num_images`` images that keep their references, the labelled set of Jin (2023).

    The choice depends only on the image ids, the size and the seed, never on the order of ``entries``:
    the ids are sorted before sampling, with a string-seeded :class:`random.Random` (stable across Python
    runs and hash seeds). Only images with references can be chosen.

    Args:
        entries: a split, e.g. the COCO Karpathy ``train`` entries.
        num_images: how many images to label, e.g. 10,000 for stage 1.
        seed: picks another subset of the same size.

    Returns:
        The chosen entries, in the order of ``entries``.

    Raises:
        ValueError: ``num_images`` is negative or larger than the number of images with references, or
            ``entries`` repeats an image id.
    """
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    ids = [entry.image_id for entry in entries]
    if len(set(ids)) != len(ids):
        raise ValueError("entries repeat image ids; a labelled subset needs each image once")
    candidates = sorted(entry.image_id for entry in entries if entry.references)
    if num_images > len(candidates):
        raise ValueError(
            f"asked for {num_images} labelled images, but the split has only {len(candidates)} images with "
            f"references (of {len(ids)})"
        )
    chosen = set(random.Random(f"clipcap.labelled_subset:{seed}").sample(candidates, num_images))
    return [entry for entry in entries if entry.image_id in chosen]


def unlabelled_pool(
    entries: Iterable[ImageEntry], exclude: Iterable[str | ImageEntry] | None = None
) -> list[ImageEntry]:
    """The images with their references removed, the unlabelled pool of Jin (2023)'s stage 2.

    Args:
        entries: a split.
        exclude: image ids (or entries) to leave out, typically the :func:`labelled_subset`, so that the
            pool holds only images whose captions were never used.

    Returns:
        The remaining entries, in their order, each with ``references=()``.

    Raises:
        TypeError: ``exclude`` is a single string (it would be read as a set of characters).
    """
    if isinstance(exclude, str):
        raise TypeError(f"exclude must be a collection of image ids, not the string {exclude!r}")
    excluded = {item.image_id if isinstance(item, ImageEntry) else item for item in exclude or ()}
    return [dataclasses.replace(entry, references=()) for entry in entries if entry.image_id not in excluded]
