"""Robust image loading for feature extraction and captioning: files and tar-shard members, any mode.

:func:`load_image` turns whatever a corpus points at into a fully decoded RGB image, or raises
:class:`ImageReadError` with a short reason that extraction records when it skips the image. It handles
JPEG, PNG, WebP (and whatever else PIL reads), grayscale, palette, CMYK, 16-bit and transparent images,
applies the EXIF orientation, and refuses decompression bombs.

Tar shards (webdataset, as img2dataset writes them) are opened once per process and kept in a small cache,
so that reading thousands of members does not re-open and re-index the shard for each one. The cache
belongs to the process that opened it: a DataLoader worker forked from a parent that already had shards
open does not reuse the parent's file objects (their shared file offset would interleave reads) but opens
its own, lazily, on first use.
"""

from __future__ import annotations

import io
import os
import tarfile
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipcap.data.records import SHARD_MEMBER_SEPARATOR

DEFAULT_MAX_PIXELS = 8192 * 8192
"""Images with more pixels than this are refused as possible decompression bombs (67 megapixels: larger
than any photograph in the captioning corpora, smaller than PIL's own warning threshold of ~89 MP)."""

MAX_OPEN_SHARDS = 8
"""Tar shards kept open per process; the least recently used one is closed beyond this."""

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


class ImageReadError(OSError):
    """An image is missing, unreadable or refused.

    Attributes:
        source: the image file, or ``<shard.tar>::<member>``.
        image_id: the id of the image it should hold.
        reason: a short reason (``file not found``, ``truncated``, ``not an image``,
            ``decompression bomb (N pixels > limit)``, ...), recorded when extraction skips the image.
    """

    def __init__(self, source: str | os.PathLike[str], image_id: str, reason: str) -> None:
        super().__init__(f"cannot read image {image_id!r} from {source}: {reason}")
        self.source = str(source)
        self.image_id = image_id
        self.reason = reason

    @property
    def path(self) -> Path:
        """:attr:`source` as a path (for a shard member, the whole ``<shard>::<member>`` string)."""
        return Path(self.source)

    def __reduce__(self):  # DataLoader workers send errors back pickled; OSError's default loses fields
        return type(self), (self.source, self.image_id, self.reason)


def load_image(
    source: str | os.PathLike[str], image_id: str, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Reads, fully decodes and converts an image to RGB.

    Decoding happens here rather than lazily in preprocessing so that a truncated or corrupt file is
    reported with its source and image id. The file is closed before returning.

    Conversion: the EXIF orientation is applied (``ImageOps.exif_transpose``), so a portrait photo stored
    sideways reaches CLIP upright; 16-bit images are scaled to 8 bits (PIL's own conversion would clip
    every value above 255 to white); transparency (RGBA, LA, palette or single-colour ``transparency``)
    is composited onto white, as ``transformers``' ``convert_to_rgb`` and our preprocessing do, because
    the colour stored under fully transparent pixels is arbitrary (often black) and would otherwise leak
    into the features; CMYK and palette images go through PIL's conversion (Adobe-inverted CMYK JPEGs are
    handled by PIL's decoder).

    Args:
        source: an image file, or ``<shard.tar>::<member>`` for a member of a tar shard.
        image_id: the image's id, for error messages.
        max_pixels: refuse images with more pixels than this (decompression-bomb guard); None disables
            this check. PIL's ``DecompressionBombWarning`` (``PIL.Image.MAX_IMAGE_PIXELS``) is treated as
            an error too, so above ~89 MP raise that global as well.

    Returns:
        An RGB image with no open file behind it.

    Raises:
        ImageReadError: the file or member is missing, is not an image, is truncated or corrupt, or is
            too large.
    """
    source = os.fspath(source)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            if SHARD_MEMBER_SEPARATOR in source:
                shard, member = source.rsplit(SHARD_MEMBER_SEPARATOR, 1)
                data = _read_shard_member(shard, member, source, image_id)
                return _decode(io.BytesIO(data), source, image_id, max_pixels)
            return _decode(source, source, image_id, max_pixels)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ImageReadError(source, image_id, f"decompression bomb ({error})") from None


def _decode(file: str | io.BytesIO, source: str, image_id: str, max_pixels: int | None) -> Image.Image:
    try:
        opened = Image.open(file)
    except FileNotFoundError:
        raise ImageReadError(source, image_id, "file not found") from None
    except IsADirectoryError:
        raise ImageReadError(source, image_id, "is a directory") from None
    except PermissionError:
        raise ImageReadError(source, image_id, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageReadError(source, image_id, "not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... from broken headers
        # A file cut short can end inside its header (a small JPEG's tables), so open() already fails.
        what = "truncated" if "truncat" in str(error).lower() else "not an image"
        raise ImageReadError(source, image_id, f"{what} ({type(error).__name__}: {error})") from None
    with opened as image:
        pixels = image.width * image.height
        if max_pixels is not None and pixels > max_pixels:
            raise ImageReadError(
                source, image_id, f"decompression bomb ({pixels} pixels > limit {max_pixels})"
            )
        try:
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise
        except EOFError:
            raise ImageReadError(source, image_id, "truncated") from None
        except Exception as error:
            if "truncat" in str(error).lower():
                raise ImageReadError(source, image_id, "truncated") from None
            raise ImageReadError(source, image_id, f"corrupt ({type(error).__name__}: {error})") from None
        try:
            # exif_transpose and the conversions make new images, so nothing refers to the file after this.
            return to_rgb(ImageOps.exif_transpose(image))
        except Exception as error:
            raise ImageReadError(
                source, image_id, f"cannot convert {image.mode} to RGB ({type(error).__name__}: {error})"
            ) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of a decoded image of any mode (see :func:`load_image` for the rules)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # Scale the full 16-bit range to 8 bits (65535 / 257 = 255), rounding to nearest. Mode "I" is what
        # older PIL versions give 16-bit PNGs; it is read as 16-bit too.
        values = np.asarray(image).astype(np.float64)
        eight_bit = np.rint(np.clip(values, 0, 65535) / 257).astype(np.uint8)
        image = Image.fromarray(eight_bit, mode="L")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image if image.mode == "RGB" else image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


# ------------------------------------------------------------------------------------------ tar shards


class _ShardCache:
    """The tar shards this process has open, least recently used first."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.shards: OrderedDict[str, tarfile.TarFile] = OrderedDict()
        self.lock = threading.Lock()


_shard_cache = _ShardCache()


def _read_shard_member(shard: str, member: str, source: str, image_id: str) -> bytes:
    global _shard_cache
    if _shard_cache.pid != os.getpid():
        # Forked (a DataLoader worker): the inherited file objects share their offsets with the parent's,
        # so they are abandoned, not closed (closing would only close the child's descriptors, but reading
        # would race with the parent); this process opens its own.
        _shard_cache = _ShardCache()
    cache = _shard_cache
    with cache.lock:
        archive = cache.shards.get(shard)
        if archive is None:
            try:
                archive = tarfile.open(shard, mode="r")  # noqa: SIM115 -- kept open in the cache
            except FileNotFoundError:
                raise ImageReadError(source, image_id, "shard not found") from None
            except (tarfile.TarError, OSError) as error:
                raise ImageReadError(source, image_id, f"unreadable shard ({error})") from None
            cache.shards[shard] = archive
            while len(cache.shards) > MAX_OPEN_SHARDS:
                cache.shards.popitem(last=False)[1].close()
        cache.shards.move_to_end(shard)
        try:
            info = archive.getmember(member)
        except KeyError:
            raise ImageReadError(source, image_id, "member not found in shard") from None
        try:
            handle = archive.extractfile(info)
            if handle is None:
                raise ImageReadError(source, image_id, "shard member is not a file")
            with handle:
                return handle.read()
        except (tarfile.TarError, OSError, EOFError) as error:
            if isinstance(error, ImageReadError):
                raise
            raise ImageReadError(source, image_id, f"unreadable shard member ({error})") from None


def close_shards() -> None:
    """Closes the tar shards this process keeps open (the next read opens them again)."""
    cache = _shard_cache
    if cache.pid != os.getpid():
        return
    with cache.lock:
        while cache.shards:
            cache.shards.popitem()[1].close()


def open_shard_count() -> int:
    """How many tar shards this process keeps open (for tests and diagnostics)."""
    return len(_shard_cache.shards) if _shard_cache.pid == os.getpid() else 0
