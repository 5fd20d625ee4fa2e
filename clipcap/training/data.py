"""Datamodules: one thin base, one subclass per corpus.

A subclass only says how to read a split's annotations (a reader from :mod:`clipcap.data.formats`) and
what the corpus is called; the base serves the cached CLIP features (``clipcap.features.FeatureCache``,
written by ``clipcap features``) with the reference captions. Training iterates over (image, caption)
pairs, so each reference is a target once per epoch, or over images alone when ``unlabelled``;
evaluation iterates over images, each with all its references.

Raw images are read only by ``clipcap features`` (through :meth:`CaptionDataModule.entries`) and by
captioning new images; training never opens them.
"""

from __future__ import annotations

import json
import logging
from abc import abstractmethod
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from clipcap.data.batch import CaptionSample, collate_caption_batch
from clipcap.data.formats import (
    AnnotationSet,
    read_coco_captions,
    read_concadia,
    read_conceptual_tsv,
    read_karpathy,
    read_nocaps,
    read_webdataset_shards,
)
from clipcap.data.records import ImageEntry
from clipcap.data.subsets import labelled_subset, unlabelled_pool
from clipcap.features.cache import META_FILE, FeatureCache, cache_expectation
from clipcap.features.encoders import load_image_encoder
from clipcap.objectives.base import TrainingData
from clipcap.synthetic.world import ANNOTATIONS_FILE, FEATURES_DIR, ensure_world, load_annotations

if TYPE_CHECKING:
    from clipcap.features.encoders import ImageEncoder

logger = logging.getLogger(__name__)


@dataclass
class CaptionSplit:
    """A split's cached features and its images (only those the cache holds).

    Attributes:
        features: the split's feature cache.
        images: the images served, in annotation order.
        grid: serve the (G, D) grid features instead of the pooled (D,) embedding.
        labelled: for an unlabelled training pool, the labelled images kept aside with their references
            (the cross-entropy anchor of a self-supervised stage); None otherwise.
    """

    features: FeatureCache
    images: list[ImageEntry]
    grid: bool = False
    labelled: list[ImageEntry] | None = None

    def __post_init__(self) -> None:
        if self.grid and self.features.grid is None:
            raise ValueError(
                f"grid features were asked for (data.init_args.grid_features=true) but the cache "
                f"{self.features.folder} has none: re-extract with `clipcap features --grid`"
            )

    def clip_features(self, image_id: str):
        """The image's cached features: (D,) pooled, or (G, D) grid."""
        return self.features.get_grid(image_id) if self.grid else self.features.get(image_id)


class CaptionPairs(Dataset):
    """One item per (image, reference caption) pair: the training unit of the original ClipCap."""

    def __init__(self, split: CaptionSplit) -> None:
        self.split = split
        self.pairs = [(i, j) for i, record in enumerate(split.images) for j in range(len(record.references))]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> CaptionSample:
        image_index, caption_index = self.pairs[index]
        record = self.split.images[image_index]
        return CaptionSample(
            image_id=record.image_id,
            clip_features=self.split.clip_features(record.image_id),
            caption=record.references[caption_index],
            references=list(record.references),
        )


class CaptionImages(Dataset):
    """One item per image with all its references, in file order (evaluation, prediction, unlabelled
    training)."""

    def __init__(self, split: CaptionSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split.images)

    def __getitem__(self, index: int) -> CaptionSample:
        record = self.split.images[index]
        return CaptionSample(
            image_id=record.image_id,
            clip_features=self.split.clip_features(record.image_id),
            caption=None,
            references=list(record.references),
        )


class CaptionDataModule(pl.LightningDataModule):
    """The base of every captioning datamodule: subclasses only read a split's annotations.

    Features live in ``features_dir/<split>/`` (``clipcap features`` writes them there, with
    ``summary.json`` in ``features_dir``). Images the cache does not hold (skipped at extraction as missing
    or corrupt) are left out with one warning.

    Args:
        features_dir: the folder holding one feature cache per split.
        clip_model: the CLIP the features are extracted with (a Hugging Face name, a local folder or
            ``synthetic:clip``); ``clipcap features`` uses it, and when set, caches made with another CLIP
            or preprocessing are refused. None skips that check (the cache's own record is trusted). A BLIP
            captioning checkpoint names BLIP's vision encoder instead, for ``clipcap.blip.BlipCaptioner``
            (see docs/blip.md).
        batch_size: training batch size (pairs, or images when ``unlabelled``).
        eval_batch_size: images per validation/test/predict batch; ``batch_size`` when None.
        num_workers: dataloader worker processes.
        pin_memory: pin host memory for faster copies to the GPU.
        predict_split: the split ``predict`` captions.
        labelled_images: train on the references of only this many training images, chosen
            reproducibly by ``subset_seed`` (Jin 2023's supervision control: 10,000, 1,000 or 100 COCO
            images); all images when None.
        subset_seed: seed of the labelled subset.
        unlabelled: serve training images without their references (the unlabelled pool of a
            self-supervised stage); validation and test keep theirs. With ``labelled_images`` the pool is
            the other training images, and the labelled ones are kept aside for ``anchor_batch_size``.
        anchor_batch_size: with ``unlabelled``, every training batch also carries this many (image,
            reference) pairs of the labelled images (all training images when ``labelled_images`` is
            None), drawn in their own shuffled cycle: the cross-entropy anchor of ``GumbelClip``
            (``batch.anchor``). 0 serves none.
        grid_features: serve the cached (G, D) patch-token features instead of the pooled embedding (for
            the Transformer mapper, and always for BLIP; extract them with ``clipcap features --grid``).
    """

    dataset_name: str = "captions"
    """Recorded in the feature caches; a cache of another dataset is refused."""
    splits_available: tuple[str, ...] = ("train", "val", "test")
    """The splits ``clipcap features`` extracts by default."""

    def __init__(
        self,
        features_dir: str | None = None,
        clip_model: str | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        predict_split: str = "test",
        labelled_images: int | None = None,
        subset_seed: int = 0,
        unlabelled: bool = False,
        grid_features: bool = False,
        anchor_batch_size: int = 0,
    ) -> None:
        super().__init__()
        # Recorded in checkpoints (datamodule_hyper_parameters): `clipcap caption` finds the CLIP the
        # captioner was trained on there.
        self.save_hyperparameters()
        self.captions_needed = True
        """Whether training batches carry reference captions; ``CaptionModule.setup`` sets it from its
        objective (False for DiscriTune and Gumbel-CLIP)."""
        self._features_dir = features_dir
        self.clip_model = clip_model
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.predict_split = predict_split
        self.labelled_images = labelled_images
        self.subset_seed = subset_seed
        self.unlabelled = unlabelled
        self.grid_features = grid_features
        if anchor_batch_size < 0 or (anchor_batch_size and not unlabelled):
            raise ValueError(
                f"{type(self).__name__}: data.init_args.anchor_batch_size={anchor_batch_size} needs "
                "data.init_args.unlabelled=true (the anchor is labelled pairs served beside an unlabelled "
                "pool) and must be ≥ 0"
            )
        self.anchor_batch_size = anchor_batch_size
        self.splits: dict[str, CaptionSplit] = {}
        self._annotations: dict[str, AnnotationSet] = {}

    # -------------------------------------------------------------------------------- what subclasses say

    @abstractmethod
    def read_split(self, split: str) -> AnnotationSet:
        """Reads one split's annotations (every image, with its file and references)."""

    # ------------------------------------------------------------------------------------------ the rest

    @property
    def features_dir(self) -> Path:
        if self._features_dir is None:
            raise ValueError(
                f"{type(self).__name__}: data.init_args.features_dir is not set; it names the folder "
                "`clipcap features` writes the CLIP feature caches into"
            )
        return Path(self._features_dir).expanduser()

    def feature_folder(self, split: str) -> Path:
        """The feature cache of one split."""
        return self.features_dir / split

    def annotations(self, split: str) -> AnnotationSet:
        """A split's annotations, read once."""
        if split not in self._annotations:
            self._annotations[split] = self.read_split(split)
        return self._annotations[split]

    def entries(self, split: str) -> list[ImageEntry]:
        """Every image of a split as the annotations list it (what ``clipcap features`` extracts)."""
        return self.annotations(split).entries

    @cached_property
    def clip_encoder(self) -> ImageEncoder:
        """The image encoder named by ``clip_model`` (a CLIP, or a BLIP checkpoint's vision encoder),
        loaded once (extraction, and checking caches)."""
        if self.clip_model is None:
            raise ValueError(f"{type(self).__name__}: data.init_args.clip_model is not set")
        return load_image_encoder(self.clip_model)

    def cache_expectation(self, split: str) -> dict[str, Any]:
        """What a split's cache must record: this dataset and split, and this CLIP when ``clip_model``."""
        if self.clip_model is None:
            return {"dataset": self.dataset_name, "split": split}
        return cache_expectation(self.clip_encoder, dataset=self.dataset_name, split=split)

    def training_data(self) -> TrainingData:
        """What an objective is told of this data at setup (:class:`clipcap.objectives.base.TrainingData`)."""
        return TrainingData(
            clip_model=self.clip_model,
            dataset=self.dataset_name,
            train_features=lambda: self.split("train").features,
            labelled=not self.unlabelled,
            train_references=None
            if self.unlabelled
            else lambda: [entry.references for entry in self.split("train").images],
        )

    def load_split(self, split: str) -> CaptionSplit:
        """Opens a split's features and pairs them with its annotations."""
        features = FeatureCache.open(self.feature_folder(split), expect=self.cache_expectation(split))
        entries = self.entries(split)
        present = [entry for entry in entries if entry.image_id in features]
        if not present:
            raise ValueError(
                f"none of the {len(entries)} images of {self.dataset_name}/{split} has features in "
                f"{features.folder}: was it extracted from other annotations?"
            )
        if len(present) < len(entries):
            logger.warning(
                "%s/%s: %d of %d images have no cached features (skipped at extraction; see %s) and are "
                "left out",
                self.dataset_name,
                split,
                len(entries) - len(present),
                len(entries),
                self.features_dir / "summary.json",
            )
        labelled = None
        if split == "train":
            chosen = present
            if self.labelled_images is not None:
                chosen = labelled_subset(present, self.labelled_images, seed=self.subset_seed)
            if self.unlabelled:
                # Jin (2023)'s stage 2: the pool is every other image, with its captions never seen.
                exclude = chosen if self.labelled_images is not None else None
                labelled, present = chosen, unlabelled_pool(present, exclude=exclude)
                if not present:
                    raise ValueError(
                        f"{self.dataset_name}/train: the unlabelled pool is empty: all "
                        f"{len(chosen)} images are in the labelled subset (data.init_args.labelled_images)"
                    )
            else:
                present = chosen
        return CaptionSplit(features=features, images=present, grid=self.grid_features, labelled=labelled)

    def reference_sets(self, split: str) -> dict[str, list[tuple[str, ...]]]:
        """The reference sets metrics score a split against, each aligned with ``split(split).images``.

        One set named ``""`` (the served references) by default; a corpus with several kinds of reference
        (Concadia's captions and descriptions) returns one set per kind, and metrics break down by set.
        """
        return {"": [entry.references for entry in self.split(split).images]}

    def split(self, name: str) -> CaptionSplit:
        if name not in self.splits:
            self.splits[name] = self.load_split(name)
        return self.splits[name]

    @property
    def clip_dim(self) -> int:
        """The CLIP feature size of this data, read from a cache's record (linked to the model)."""
        for split in ("train", self.predict_split, *self.splits_available):
            meta = self.feature_folder(split) / META_FILE
            if meta.is_file():
                return int(json.loads(meta.read_text(encoding="utf-8"))["dim"])
        raise FileNotFoundError(
            f"no CLIP feature cache in {self.features_dir}: extract the features first with "
            "`clipcap features --config <this config>`"
        )

    def setup(self, stage: str) -> None:
        needed = {
            "fit": ["train", "val"],
            "validate": ["val"],
            "test": ["test"],
            "predict": [self.predict_split],
        }
        for name in needed[stage]:
            self.split(name)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=collate_caption_batch,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        train = self.split("train")
        # An objective that needs no references (DiscriTune, Gumbel-CLIP) trains on each image once per
        # epoch: pairs would repeat an image inside a batch, where it would be its own distractor.
        images_only = self.unlabelled or not self.captions_needed
        dataset = CaptionImages(train) if images_only else CaptionPairs(train)
        if not len(dataset):
            # Lightning would skip the fit and exit 0 with an untrained model.
            what = "images" if images_only else "(image, reference) pairs"
            raise ValueError(
                f"{self.dataset_name}/train: no {what} to train on ({len(train.images)} images served from "
                f"{self.feature_folder('train')}); check the annotation file, the feature cache and "
                "labelled_images"
            )
        loader = self._loader(dataset, self.batch_size, shuffle=True)
        if not self.anchor_batch_size:
            return loader
        anchor = CaptionPairs(replace(train, images=train.labelled or []))
        if not len(anchor):
            raise ValueError(
                f"{self.dataset_name}/train: anchor_batch_size is set but the labelled images have no "
                "references to anchor on"
            )
        # Lightning cycles the shorter loader ("max_size_cycle"): an epoch is one pass over the pool.
        return {"images": loader, "anchor": self._loader(anchor, self.anchor_batch_size, shuffle=True)}

    def val_dataloader(self) -> DataLoader:
        return self._loader(CaptionImages(self.split("val")), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(CaptionImages(self.split("test")), self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(
            CaptionImages(self.split(self.predict_split)), self.eval_batch_size, shuffle=False
        )


def _for_split(mapping: dict[str, str] | None, split: str, option: str, owner: str) -> str:
    """``mapping[split]`` or a clear error naming the option."""
    if not mapping or split not in mapping:
        have = sorted(mapping or {})
        raise ValueError(f"{owner}: data.init_args.{option} has no entry for split {split!r} (it has {have})")
    return mapping[split]


class CocoKarpathy(CaptionDataModule):
    """COCO with the Karpathy split (``dataset_coco.json``): 113k train (``restval`` included), 5k val,
    5k test.

    Args:
        annotation_file: ``dataset_coco.json``.
        image_dir: the COCO image folder holding ``train2014/`` and ``val2014/`` (the JSON's ``filepath``).
        restval_as_train: train on ``restval`` too (the convention); otherwise it is a split of its own.
        **kwargs: see :class:`CaptionDataModule`.
    """

    dataset_name = "coco-karpathy"

    def __init__(
        self, annotation_file: str, image_dir: str, restval_as_train: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.annotation_file = annotation_file
        self.image_dir = image_dir
        self.restval_as_train = restval_as_train
        if not restval_as_train:
            self.splits_available = ("train", "restval", "val", "test")

    def read_split(self, split: str) -> AnnotationSet:
        return read_karpathy(self.annotation_file, self.image_dir, split, self.restval_as_train)


class Flickr30k(CaptionDataModule):
    """Flickr30k with the Karpathy split (``dataset_flickr30k.json``): 29k train, 1k val, 1k test.

    Args:
        annotation_file: ``dataset_flickr30k.json``.
        image_dir: the folder of ``<photo id>.jpg`` files.
        **kwargs: see :class:`CaptionDataModule`.
    """

    dataset_name = "flickr30k"

    def __init__(self, annotation_file: str, image_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.annotation_file = annotation_file
        self.image_dir = image_dir

    def read_split(self, split: str) -> AnnotationSet:
        return read_karpathy(self.annotation_file, self.image_dir, split)


class CocoCaptions(CaptionDataModule):
    """COCO from the official ``captions_<split>2014.json`` files, one file and image folder per split.

    Args:
        annotation_files: split → annotation file, e.g. ``{train: captions_train2014.json, val:
            captions_val2014.json}``.
        image_dirs: split → image folder (``train2014/``, ``val2014/``).
        **kwargs: see :class:`CaptionDataModule`.
    """

    dataset_name = "coco"

    def __init__(self, annotation_files: dict[str, str], image_dirs: dict[str, str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.annotation_files = dict(annotation_files)
        self.image_dirs = dict(image_dirs)
        self.splits_available = tuple(self.annotation_files)

    def read_split(self, split: str) -> AnnotationSet:
        name = type(self).__name__
        return read_coco_captions(
            _for_split(self.annotation_files, split, "annotation_files", name),
            _for_split(self.image_dirs, split, "image_dirs", name),
            split,
        )


class ConceptualCaptions(CaptionDataModule):
    """Conceptual Captions, either as the TSV files with a folder of downloaded images each, or as the
    webdataset tar shards img2dataset writes.

    Args:
        tsv_files: split → TSV (``caption<TAB>url``, no header), e.g. ``Train_GCC-training.tsv``.
        image_dirs: split → folder of the TSV's downloaded images, named by row index.
        shards: split → folder of ``*.tar`` shards (instead of ``tsv_files``/``image_dirs``).
        **kwargs: see :class:`CaptionDataModule`.
    """

    dataset_name = "conceptual-captions"

    def __init__(
        self,
        tsv_files: dict[str, str] | None = None,
        image_dirs: dict[str, str] | None = None,
        shards: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if bool(shards) == bool(tsv_files):
            raise ValueError(
                "ConceptualCaptions: give either data.init_args.shards (webdataset tars) or "
                "data.init_args.tsv_files with data.init_args.image_dirs, not both or neither"
            )
        self.tsv_files = dict(tsv_files or {})
        self.image_dirs = dict(image_dirs or {})
        self.shards = dict(shards or {})
        self.splits_available = tuple(self.shards or self.tsv_files)

    def read_split(self, split: str) -> AnnotationSet:
        name = type(self).__name__
        if self.shards:
            return read_webdataset_shards(_for_split(self.shards, split, "shards", name), split)
        return read_conceptual_tsv(
            _for_split(self.tsv_files, split, "tsv_files", name),
            _for_split(self.image_dirs, split, "image_dirs", name),
            split,
        )


NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")


class NoCaps(CaptionDataModule):
    """nocaps (validation with references, test for prediction only), with its in/near/out domains.

    Features are extracted for every image; ``domains`` selects what is served, so one cache serves every
    domain setting.

    Args:
        annotation_files: split → file, e.g. ``{val: nocaps_val_4500_captions.json, test:
            nocaps_test_image_info.json}``.
        image_dirs: split → image folder.
        domains: the domains served (``in-domain``, ``near-domain``, ``out-domain``); all when None.
        **kwargs: see :class:`CaptionDataModule`; ``predict_split: test`` captions the test images for
            the evaluation server.
    """

    dataset_name = "nocaps"

    def __init__(
        self,
        annotation_files: dict[str, str],
        image_dirs: dict[str, str],
        domains: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        unknown = sorted(set(domains or ()) - set(NOCAPS_DOMAINS))
        if unknown:
            raise ValueError(
                f"NoCaps: data.init_args.domains has {unknown}; the domains are {list(NOCAPS_DOMAINS)}"
            )
        self.annotation_files = dict(annotation_files)
        self.image_dirs = dict(image_dirs)
        self.domains = list(domains) if domains is not None else None
        self.splits_available = tuple(self.annotation_files)

    def read_split(self, split: str) -> AnnotationSet:
        name = type(self).__name__
        return read_nocaps(
            _for_split(self.annotation_files, split, "annotation_files", name),
            _for_split(self.image_dirs, split, "image_dirs", name),
            split,
        )

    def load_split(self, split: str) -> CaptionSplit:
        loaded = super().load_split(split)
        if self.domains is not None:
            kept = [entry for entry in loaded.images if entry.group in self.domains]
            loaded = replace(loaded, images=kept)
        return loaded


class Concadia(CaptionDataModule):
    """Concadia (``wiki_split.json``), with its captions or its descriptions as the references.

    Args:
        annotation_file: ``wiki_split.json``.
        image_dir: the folder of its images.
        reference: ``caption`` or ``description``: which text is the reference set.
        **kwargs: see :class:`CaptionDataModule`.
    """

    dataset_name = "concadia"

    def __init__(
        self, annotation_file: str, image_dir: str, reference: str = "caption", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if reference not in ("caption", "description"):
            raise ValueError(f"Concadia: reference must be 'caption' or 'description', got {reference!r}")
        self.annotation_file = annotation_file
        self.image_dir = image_dir
        self.reference = reference

    def read_split(self, split: str) -> AnnotationSet:
        return read_concadia(self.annotation_file, self.image_dir, split, reference=self.reference)

    def reference_sets(self, split: str) -> dict[str, list[tuple[str, ...]]]:
        """Both of Concadia's reference sets, so metrics report captions and descriptions side by side
        (the served one, ``reference``, is what training targets)."""
        images = self.split(split).images
        sets = {}
        for kind in ("caption", "description"):
            by_id = {
                entry.image_id: entry.references
                for entry in read_concadia(
                    self.annotation_file, self.image_dir, split, reference=kind
                ).entries
            }
            sets[kind] = [by_id.get(entry.image_id, ()) for entry in images]
        return sets


class SyntheticCaptions(CaptionDataModule):
    """The embedded synthetic world: generated images, their references and cached tiny-CLIP features.

    Its ``annotations.json`` is read into the same :class:`~clipcap.data.records.ImageEntry` records as
    every corpus, and its features are written by the same extraction code (``clipcap features`` with
    this datamodule rebuilds them).

    Args:
        world_dir: the world's folder; the default world (built on first use) when None.
        features_dir: the feature caches; the world's own ``features/`` when None.
        clip_model: see :class:`CaptionDataModule`; the world's CLIP is ``synthetic:clip``.
        **kwargs: see :class:`CaptionDataModule`.
    """

    dataset_name = "synthetic"

    def __init__(
        self,
        world_dir: str | None = None,
        features_dir: str | None = None,
        clip_model: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(features_dir=features_dir, clip_model=clip_model, **kwargs)
        self.world_dir = world_dir

    @property
    def world(self) -> Path:
        return ensure_world(Path(self.world_dir) if self.world_dir else None)

    @property
    def features_dir(self) -> Path:
        if self._features_dir is not None:
            return Path(self._features_dir).expanduser()

        return self.world / FEATURES_DIR

    def prepare_data(self) -> None:
        self.world  # noqa: B018 - builds the world once, on rank 0, if it is absent

    def read_split(self, split: str) -> AnnotationSet:
        world = self.world
        records = load_annotations(world, split=split)
        if not records:
            raise ValueError(f"the synthetic world at {world} has no images in split {split!r}")
        entries = [
            ImageEntry(
                image_id=record.image_id,
                image=str(world / record.file_name),
                references=record.captions,
                split=split,
            )
            for record in records
        ]
        return AnnotationSet(
            source=world / ANNOTATIONS_FILE, entries=entries, dropped_empty_captions=0, notes={}
        )
