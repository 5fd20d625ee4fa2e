"""What every corpus reader yields: one record per image, with its file and its reference captions.

The readers in :mod:`clipcap.data.formats` turn annotation files as they are distributed (COCO, Flickr30k,
Conceptual Captions, nocaps, Concadia) into lists of :class:`ImageEntry`; feature extraction reads the
images they point at, and the datamodules serve the cached features with the references.
"""

from __future__ import annotations

from dataclasses import dataclass

SHARD_MEMBER_SEPARATOR = "::"
"""Separates a tar shard's path from a member's name in :attr:`ImageEntry.image`
(``/data/cc3m/00000.tar::000000012.jpg``), for images stored in webdataset shards."""


@dataclass(frozen=True)
class ImageEntry:
    """One image of a corpus split.

    Attributes:
        image_id: a stable id, unique within the corpus (the same image always gets the same id, whatever
            order the annotation file lists it in); features are cached under it.
        image: the image file's path, or ``<shard.tar>::<member>`` for a member of a tar shard.
        references: the reference captions, in file order, empty captions already dropped; empty for
            images without captions (nocaps test, an unlabelled pool).
        split: the split the image belongs to (``train``, ``val``, ``test``, ...).
        group: a subset the metrics break down by, where the corpus has one (nocaps ``in-domain``,
            ``near-domain``, ``out-domain``); None otherwise.
    """

    image_id: str
    image: str
    references: tuple[str, ...]
    split: str
    group: str | None = None

    @property
    def shard_member(self) -> tuple[str, str] | None:
        """``(shard path, member name)`` if the image is a tar-shard member, else None."""
        if SHARD_MEMBER_SEPARATOR not in self.image:
            return None
        shard, member = self.image.rsplit(SHARD_MEMBER_SEPARATOR, 1)
        return shard, member
