"""Readers for the captioning corpora as they are distributed, each returning an :class:`AnnotationSet`.

- :func:`read_karpathy`: Karpathy splits ``dataset_coco.json``, ``dataset_flickr30k.json``;
- :func:`read_coco_captions`: raw COCO ``captions_train2014.json``, ``captions_val2014.json``;
- :func:`read_nocaps`: ``nocaps_val_4500_captions.json`` and the test image info (no captions);
- :func:`read_concadia`: Concadia ``wiki_split.json``, with caption or description as the reference;
- :func:`read_conceptual_tsv`: Conceptual Captions ``caption<TAB>url`` TSV plus downloaded images;
- :func:`read_webdataset_shards`: the ``*.tar`` shards img2dataset writes.

Shared rules: captions are stripped, and empty or whitespace-only ones are dropped and counted in
:attr:`AnnotationSet.dropped_empty_captions` (only for the entries returned); images whose references end up
empty are kept and counted in ``notes["images_without_captions"]``. Ids are strings, derived from the image
itself rather than from its position, so they do not change when a file is reordered. An image listed
twice with identical contents is kept once (``notes["repeated_images"]``); listed twice with different
contents it is an error, since a silent choice could leak an image across splits.

A malformed annotation file raises one :class:`AnnotationError` that names the file, the record and the
field. Nothing here needs torch or Lightning.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipcap.data.records import SHARD_MEMBER_SEPARATOR, ImageEntry

KARPATHY_SPLITS = ("train", "restval", "val", "test")
CONCADIA_SPLITS = ("train", "val", "test")
CONCADIA_REFERENCES = ("caption", "description")
NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})


class AnnotationError(ValueError):
    """An annotation file is malformed: not JSON, a missing or ill-typed field, an unknown value.

    Attributes:
        path: the file.
        record: which record, e.g. ``images[12] (imgid 12)`` or ``line 7``.
        field: which field of the record, e.g. ``sentences``.
        problem: what is wrong, e.g. ``is missing``.
    """

    def __init__(self, path: str | os.PathLike[str], record: str, field: str, problem: str) -> None:
        self.path = Path(path)
        self.record = record
        self.field = field
        self.problem = problem
        super().__init__(f"{self.path.name}: {record}: field {field!r} {problem}")


@dataclass
class AnnotationSet:
    """What a reader found in one annotation file (or shard folder).

    Attributes:
        source: the annotation file, or the shard folder, read.
        entries: one per image, in the order the reader documents.
        dropped_empty_captions: captions among ``entries``' images that were empty or whitespace-only and
            were dropped.
        notes: other counters worth reporting, e.g. ``{"images_without_captions": 3}``.
    """

    source: Path
    entries: list[ImageEntry]
    dropped_empty_captions: int
    notes: dict[str, int]


# ------------------------------------------------------------------------------------------ readers


def read_karpathy(
    path: str | os.PathLike[str], image_root: str | Path, split: str, restval_as_train: bool = True
) -> AnnotationSet:
    """Reads a Karpathy split file (``dataset_coco.json``, ``dataset_flickr30k.json``).

    Entries come in file order. The image file is ``image_root/filepath/filename`` (``image_root/filename``
    without ``filepath``, as in Flickr30k); the id is ``str(cocoid)``, or the filename's stem (Flickr's
    photo id) without ``cocoid``; references are ``sentences[].raw``.

    Args:
        path: the JSON file.
        image_root: the folder the image paths are relative to.
        split: ``train``, ``val`` or ``test``; also ``restval`` when ``restval_as_train`` is False.
        restval_as_train: count ``restval`` images as ``train``, the usual convention.

    Raises:
        AnnotationError: the file is malformed.
        ValueError: ``split`` is not one of the above.
    """
    wanted = ("train", "val", "test") if restval_as_train else ("train", "restval", "val", "test")
    if split not in wanted:
        hint = (
            " (restval images are read as train; pass restval_as_train=False)" if split == "restval" else ""
        )
        raise ValueError(f"split must be one of {', '.join(wanted)}, got {split!r}{hint}")
    path = Path(path)
    seen = _SeenImages(path)
    entries: list[ImageEntry] = []
    dropped = 0
    for record, item, filename, file_split in _image_records(path, "imgid", KARPATHY_SPLITS):
        filepath = _field(item, "filepath", str, path, record, required=False)
        cocoid = _field(item, "cocoid", (int, str), path, record, required=False)
        raw_captions = []
        for position, sentence in enumerate(_field(item, "sentences", list, path, record)):
            sentence_record = f"{record} sentences[{position}]"
            sentence = _as_object(sentence, path, sentence_record, "sentences")
            raw_captions.append(_field(sentence, "raw", str, path, sentence_record))
        image_id = str(cocoid) if cocoid is not None else Path(filename).stem
        image = Path(image_root) / filepath / filename if filepath else Path(image_root) / filename
        id_field = "cocoid" if cocoid is not None else "filename"
        if not seen.is_new(image_id, (str(image), raw_captions, file_split), record, id_field):
            continue
        if file_split == "restval" and restval_as_train:
            file_split = "train"
        if file_split != split:
            continue
        references, empty = _clean_captions(raw_captions)
        dropped += empty
        entries.append(ImageEntry(image_id, str(image), references, split))
    return _annotation_set(path, entries, dropped, repeated_images=seen.repeats)


def read_coco_captions(path: str | os.PathLike[str], image_root: str | Path, split: str) -> AnnotationSet:
    """Reads a raw COCO caption file (``captions_train2014.json``, ``captions_val2014.json``).

    Entries follow the ``images`` list; each image's references are its annotations in file order, matched
    by ``image_id`` (the annotations are not sorted). Images without captions are kept with empty
    references. The id is ``str(images[].id)``; the image file is ``image_root/file_name``.

    Args:
        path: the JSON file.
        image_root: the folder holding the images (``train2014/``, ``val2014/``).
        split: recorded in the entries; the file itself is the split.

    Raises:
        AnnotationError: the file is malformed, or an annotation points at an unknown image.
    """
    return _read_coco_style(Path(path), image_root, split, annotations_required=True, domains=None)


def read_nocaps(
    path: str | os.PathLike[str],
    image_root: str | Path,
    split: str = "val",
    domains: Iterable[str] | str | None = None,
) -> AnnotationSet:
    """Reads nocaps (``nocaps_val_4500_captions.json``, or ``nocaps_test_image_info.json``).

    Like :func:`read_coco_captions`, with each image's ``domain`` in :attr:`ImageEntry.group` so metrics
    can be broken down by it. The test file has no ``annotations``: its entries have empty references and
    serve prediction only.

    Args:
        path: the JSON file.
        image_root: the folder holding the images.
        split: recorded in the entries.
        domains: the domains to keep (``in-domain``, ``near-domain``, ``out-domain``; a single name is
            accepted too), or None for all.

    Raises:
        AnnotationError: the file is malformed (including an image with an unknown domain).
        ValueError: ``domains`` names an unknown domain, or none.
    """
    if domains is None:
        domains = NOCAPS_DOMAINS
    domains = (domains,) if isinstance(domains, str) else tuple(domains)
    unknown = [domain for domain in domains if domain not in NOCAPS_DOMAINS]
    if unknown or not domains:
        problem = f"unknown domains {unknown}" if unknown else "no domains"
        raise ValueError(f"{problem}; valid nocaps domains are {', '.join(NOCAPS_DOMAINS)}")
    return _read_coco_style(Path(path), image_root, split, annotations_required=False, domains=domains)


def read_concadia(
    path: str | os.PathLike[str], image_root: str | Path, split: str, reference: str = "caption"
) -> AnnotationSet:
    """Reads Concadia's ``wiki_split.json``.

    Concadia pairs each Wikipedia image with a caption (what the image adds to the article) and a
    description (what it shows, for alt text); they are different tasks, so one is chosen as the reference
    set. Entries come in file order; the id is ``filename``, the image file ``image_root/filename``.

    Args:
        path: the JSON file.
        image_root: the folder holding the images.
        split: ``train``, ``val`` or ``test``.
        reference: ``caption`` or ``description``.

    Raises:
        AnnotationError: the file is malformed.
        ValueError: ``split`` or ``reference`` is not one of the above.
    """
    if reference not in CONCADIA_REFERENCES:
        raise ValueError(f"reference must be one of {', '.join(CONCADIA_REFERENCES)}, got {reference!r}")
    if split not in CONCADIA_SPLITS:
        raise ValueError(f"split must be one of {', '.join(CONCADIA_SPLITS)}, got {split!r}")
    path = Path(path)
    seen = _SeenImages(path)
    entries: list[ImageEntry] = []
    dropped = 0
    for record, item, filename, file_split in _image_records(path, "filename", CONCADIA_SPLITS):
        # Both texts are checked whichever is chosen, so a file is valid or not independently of `reference`.
        texts = {
            name: _field(_field(item, name, dict, path, record), "raw", str, path, f"{record} {name}")
            for name in CONCADIA_REFERENCES
        }
        image = str(Path(image_root) / filename)
        if not seen.is_new(filename, (image, texts, file_split), record, "filename") or file_split != split:
            continue
        references, empty = _clean_captions([texts[reference]])
        dropped += empty
        entries.append(ImageEntry(filename, image, references, split))
    return _annotation_set(path, entries, dropped, repeated_images=seen.repeats)


def read_conceptual_tsv(path: str | os.PathLike[str], image_root: str | Path, split: str) -> AnnotationSet:
    """Reads a Conceptual Captions TSV (no header, ``caption<TAB>url`` per line).

    Entries come in row order; the id is the 0-based row index zero-padded to 8 digits. Images are fetched
    separately and named by row index, padded or not, as ``.jpg``, ``.jpeg``, ``.png`` or ``.webp``. Dead
    links are common, so rows whose image is absent are still returned, pointing at the expected
    ``image_root/<id>.jpg``, for feature extraction to report as missing.

    The file is read as bytes: a line that is not valid UTF-8 is decoded with replacement characters and
    counted rather than stopping a multi-million-row read.

    Args:
        path: the TSV file.
        image_root: the folder the images were downloaded into.
        split: recorded in the entries.

    Raises:
        AnnotationError: a line does not have exactly one tab.
        FileNotFoundError: ``image_root`` does not exist.
    """
    path = Path(path)
    image_root = Path(image_root)
    downloaded, ambiguous_rows = _images_by_row(image_root)
    entries: list[ImageEntry] = []
    dropped = invalid_utf8 = not_downloaded = 0
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline ends the last row rather than starting an empty one
    for row, raw_line in enumerate(lines):
        raw_line = raw_line.removesuffix(b"\r")
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError:
            line = raw_line.decode("utf-8", errors="replace")
            invalid_utf8 += 1
        columns = line.split("\t")
        if len(columns) != 2:
            extra = f"is followed by {len(columns) - 2} extra tab-separated columns"
            problem = "is missing" if len(columns) == 1 else extra
            raise AnnotationError(path, f"line {row + 1}", "url", f"{problem} (expected caption<TAB>url)")
        image_id = f"{row:08d}"
        image = downloaded.get(row)
        if image is None:
            not_downloaded += 1
            image = image_root / f"{image_id}.jpg"
        references, empty = _clean_captions([columns[0]])
        dropped += empty
        entries.append(ImageEntry(image_id, str(image), references, split))
    return _annotation_set(
        path,
        entries,
        dropped,
        lines_with_invalid_utf8=invalid_utf8,
        images_not_downloaded=not_downloaded,
        rows_with_several_image_files=ambiguous_rows,
    )


def read_webdataset_shards(
    shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], split: str
) -> AnnotationSet:
    """Reads the tar shards img2dataset writes (``00000.tar`` holding ``000000000.jpg``, ``.txt``, ...).

    Only member names and the small ``.txt`` captions are read; images stay in the tar and
    :attr:`ImageEntry.image` is ``<shard.tar>::<member>``. Members are grouped by key (the name up to the
    first dot of its base name, as webdataset does), which is also the image id: img2dataset keys are
    unique across shards. Entries come shard by shard, by key within a shard. Samples without an image
    member (failed downloads) are skipped and counted; samples without a ``.txt`` are kept with empty
    references.

    Args:
        shards: a folder (all its ``*.tar``, sorted by name) or a list of tar files, read in that order.
        split: recorded in the entries.

    Raises:
        AnnotationError: a shard is not a readable tar, a key has several images, or a key repeats.
        FileNotFoundError: the folder or a shard does not exist.
        ValueError: there are no shards.
    """
    if isinstance(shards, (str, os.PathLike)):
        folder = Path(shards)
        if not folder.is_dir():
            raise FileNotFoundError(f"shard folder {folder} does not exist")
        shard_paths = sorted(folder.glob("*.tar"))
        source = folder
    else:
        shard_paths = [Path(shard) for shard in shards]
        source = Path(os.path.commonpath(shard_paths)) if shard_paths else Path()
    if not shard_paths:
        raise ValueError(f"no .tar shards in {shards}")
    shard_of_key: dict[str, Path] = {}
    entries: list[ImageEntry] = []
    dropped = without_image = invalid_utf8 = 0
    for shard in shard_paths:
        images, captions = _read_shard(shard)
        for key in sorted(images.keys() | captions.keys()):
            if key not in images:
                without_image += 1
                continue
            if key in shard_of_key:
                raise AnnotationError(
                    shard, f"member {images[key]}", "key", f"repeats key {key!r} of shard {shard_of_key[key]}"
                )
            shard_of_key[key] = shard
            raw_caption = captions.get(key)
            references: tuple[str, ...] = ()
            if raw_caption is not None:
                try:
                    caption = raw_caption.decode("utf-8")
                except UnicodeDecodeError:
                    caption = raw_caption.decode("utf-8", errors="replace")
                    invalid_utf8 += 1
                references, empty = _clean_captions([caption])
                dropped += empty
            entries.append(
                ImageEntry(key, f"{shard}{SHARD_MEMBER_SEPARATOR}{images[key]}", references, split)
            )
    return _annotation_set(
        source, entries, dropped, samples_without_image=without_image, captions_with_invalid_utf8=invalid_utf8
    )


# ------------------------------------------------------------------------------------------ helpers


class _SeenImages:
    """Image ids met so far, telling a harmless repeat (skipped) from a conflicting one (an error)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._first: dict[str, tuple[Any, str]] = {}
        self.repeats = 0

    def is_new(self, image_id: str, contents: Any, record: str, id_field: str) -> bool:
        """True the first time ``image_id`` is met, False for an identical repeat.

        Raises:
            AnnotationError: the image was met before with other ``contents``.
        """
        if image_id not in self._first:
            self._first[image_id] = (contents, record)
            return True
        first_contents, first_record = self._first[image_id]
        if first_contents != contents:
            problem = f"repeats image {image_id!r} of {first_record} with different contents"
            raise AnnotationError(self._path, record, id_field, problem)
        self.repeats += 1
        return False


def _read_coco_style(
    path: Path,
    image_root: str | Path,
    split: str,
    annotations_required: bool,
    domains: tuple[str, ...] | None,
) -> AnnotationSet:
    """COCO caption layout (``images`` + ``annotations`` by ``image_id``), shared by COCO and nocaps.

    ``domains`` is None for COCO (no ``domain`` field read), else the nocaps domains to keep.
    """
    document = _load_json_object(path)
    images = _field(document, "images", list, path, "top level")
    annotations = _field(document, "annotations", list, path, "top level", required=annotations_required)
    seen = _SeenImages(path)
    image_records: dict[str, tuple[str, str | None]] = {}
    for index, item in enumerate(images):
        record = _record_name("images", index, item, "id")
        item = _as_object(item, path, record, "images")
        # Ids are ints in the official files; strings are accepted for derived files, and both become str.
        image_id = str(_field(item, "id", (int, str), path, record))
        file_name = _field(item, "file_name", str, path, record)
        domain = None
        if domains is not None:
            domain = _field(item, "domain", str, path, record)
            if domain not in NOCAPS_DOMAINS:
                raise AnnotationError(
                    path, record, "domain", f"has unknown value {domain!r} (expected one of {NOCAPS_DOMAINS})"
                )
        if seen.is_new(image_id, (file_name, domain), record, "id"):
            image_records[image_id] = (file_name, domain)

    raw_captions: dict[str, list[str]] = {image_id: [] for image_id in image_records}
    for index, item in enumerate(annotations or []):
        record = _record_name("annotations", index, item, "id")
        item = _as_object(item, path, record, "annotations")
        image_id = str(_field(item, "image_id", (int, str), path, record))
        caption = _field(item, "caption", str, path, record)
        if image_id not in raw_captions:
            raise AnnotationError(path, record, "image_id", f"refers to unknown image {image_id}")
        raw_captions[image_id].append(caption)

    entries: list[ImageEntry] = []
    dropped = 0
    for image_id, (file_name, domain) in image_records.items():
        if domains is not None and domain not in domains:
            continue
        references, empty = _clean_captions(raw_captions[image_id])
        dropped += empty
        entries.append(ImageEntry(image_id, str(Path(image_root) / file_name), references, split, domain))
    return _annotation_set(path, entries, dropped, repeated_images=seen.repeats)


def _images_by_row(image_root: Path) -> tuple[dict[int, Path], int]:
    """Downloaded Conceptual Captions images by row index, from one listing of ``image_root``.

    Returns:
        ``{row: path}``, and how many rows had several files (``7.jpg`` and ``00000007.png``); the first
        name in sorted order is used for those.
    """
    if not image_root.is_dir():
        raise FileNotFoundError(f"image folder {image_root} does not exist")
    by_row: dict[int, Path] = {}
    ambiguous_rows: set[int] = set()
    with os.scandir(image_root) as listing:
        names = sorted(item.name for item in listing if item.is_file())
    for name in names:
        stem, _, extension = name.rpartition(".")
        if not (stem.isascii() and stem.isdigit() and extension.lower() in IMAGE_EXTENSIONS):
            continue
        row = int(stem)
        if row in by_row:
            ambiguous_rows.add(row)
        else:
            by_row[row] = image_root / name
    return by_row, len(ambiguous_rows)


def _read_shard(shard: Path) -> tuple[dict[str, str], dict[str, bytes]]:
    """Image member names and raw ``.txt`` captions of one tar shard, by sample key."""
    images: dict[str, str] = {}
    captions: dict[str, bytes] = {}
    try:
        with tarfile.open(shard, "r") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                stem, dot, extension = base.partition(".")
                if not dot:
                    continue
                key = f"{directory}/{stem}" if directory else stem
                extension = extension.lower()
                if extension in IMAGE_EXTENSIONS:
                    if key in images:
                        raise AnnotationError(
                            shard, f"member {member.name}", "key", f"has a second image ({images[key]})"
                        )
                    images[key] = member.name
                elif extension == "txt":
                    handle = archive.extractfile(member)
                    captions[key] = handle.read() if handle is not None else b""
            end = archive.offset
    except tarfile.TarError as error:
        raise AnnotationError(
            shard, "archive", "(tar)", f"is not a readable tar archive ({error})"
        ) from error
    _check_tar_end(shard, end)
    return images, captions


def _check_tar_end(shard: Path, end: int) -> None:
    """Raises unless the end-of-archive marker (two zero blocks) follows the last member.

    Python's ``tarfile`` stops quietly at the end of a file cut at a header boundary, or inside a member
    it has not read yet, so a shard truncated by an interrupted download or copy would lose its later
    samples without a word.
    """
    size = shard.stat().st_size
    with open(shard, "rb") as handle:
        handle.seek(end)
        marker = handle.read(2 * tarfile.BLOCKSIZE)
    if len(marker) < 2 * tarfile.BLOCKSIZE or marker.strip(b"\0"):
        raise AnnotationError(
            shard,
            "archive",
            "(tar)",
            f"is truncated: its {size} bytes end without the end-of-archive blocks after the member ending "
            f"at byte {end}, so later samples are missing; download or copy the shard again",
        )


def _annotation_set(source: Path, entries: list[ImageEntry], dropped: int, **notes: int) -> AnnotationSet:
    notes["images_without_captions"] = sum(1 for entry in entries if not entry.references)
    return AnnotationSet(source, entries, dropped, notes)


def _clean_captions(raw_captions: Iterable[str]) -> tuple[tuple[str, ...], int]:
    """Stripped captions with the empty ones removed, and how many were removed."""
    stripped = [caption.strip() for caption in raw_captions]
    references = tuple(caption for caption in stripped if caption)
    return references, len(stripped) - len(references)


def _load_json_object(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_bytes())
    except json.JSONDecodeError as error:
        raise AnnotationError(
            path, f"line {error.lineno} column {error.colno}", "(document)", f"is not valid JSON: {error.msg}"
        ) from None
    except UnicodeDecodeError as error:
        raise AnnotationError(path, f"byte {error.start}", "(document)", "is not valid UTF-8") from None
    if not isinstance(document, dict):
        raise AnnotationError(
            path, "top level", "(document)", f"must be an object, got {_describe(document)}"
        )
    return document


_JSON_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer"}


def _field(
    mapping: dict[str, Any],
    key: str,
    expected: type | tuple[type, ...],
    path: Path,
    record: str,
    required: bool = True,
) -> Any:
    """``mapping[key]``, checked against the ``expected`` type; None if it is absent and not required.

    Raises:
        AnnotationError: the field is required and missing, or has another type.
    """
    if key not in mapping:
        if required:
            raise AnnotationError(path, record, key, "is missing")
        return None
    value = mapping[key]
    expected_types = expected if isinstance(expected, tuple) else (expected,)
    # JSON true/false load as bool, a subclass of int; they are never a valid id or count.
    if isinstance(value, bool) or not isinstance(value, expected_types):
        wanted = " or ".join(_JSON_TYPE_NAMES[kind] for kind in expected_types)
        raise AnnotationError(path, record, key, f"must be {wanted}, got {_describe(value)}")
    return value


def _image_records(
    path: Path, id_key: str, splits: tuple[str, ...]
) -> Iterator[tuple[str, dict[str, Any], str, str]]:
    """Each item of the ``images`` list of a Karpathy-style file (COCO Karpathy, Flickr30k, Concadia) as
    ``(record, item, filename, split)``, its ``filename`` and ``split`` fields checked (``record`` names it
    in errors, by position and ``id_key``)."""
    images = _field(_load_json_object(path), "images", list, path, "top level")
    for index, item in enumerate(images):
        record = _record_name("images", index, item, id_key)
        item = _as_object(item, path, record, "images")
        filename = _field(item, "filename", str, path, record)
        file_split = _field(item, "split", str, path, record)
        if file_split not in splits:
            raise AnnotationError(
                path, record, "split", f"has unknown value {file_split!r} (expected one of {splits})"
            )
        yield record, item, filename, file_split


def _as_object(item: Any, path: Path, record: str, list_field: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise AnnotationError(path, record, list_field, f"item must be an object, got {_describe(item)}")
    return item


def _record_name(list_field: str, index: int, item: Any, id_key: str) -> str:
    """``images[12] (imgid 12)``: the position, plus the record's own id where it has a readable one."""
    name = f"{list_field}[{index}]"
    if (
        isinstance(item, dict)
        and isinstance(item.get(id_key), (int, str))
        and not isinstance(item[id_key], bool)
    ):
        name += f" ({id_key} {item[id_key]})"
    return name


def _describe(value: Any) -> str:
    kind = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )
    shown = repr(value)
    return f"{kind} {shown[:40] + '...' if len(shown) > 40 else shown}"
