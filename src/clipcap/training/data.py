"""Datamodules: one thin base, one subclass per corpus.

Every datamodule serves cached CLIP features (``clipcap.features.FeatureCache``) with reference
captions. Training iterates over (image, caption) pairs, so each reference is a target once per epoch;
evaluation iterates over images, each with all its references.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from clipcap.data.batch import CaptionSample, collate_caption_batch
from clipcap.features.cache import FeatureCache


@dataclass
class ImageRecord:
    """An image of a split: its id and its reference captions."""

    image_id: str
    references: list[str]


@dataclass
class CaptionSplit:
    """A split's cached features and its images' references."""

    features: FeatureCache
    images: list[ImageRecord]

    def __post_init__(self) -> None:
        missing = [r.image_id for r in self.images if r.image_id not in self.features]
        if missing:
            raise ValueError(
                f"{len(missing)} image(s) have no cached features in {self.features.folder}, e.g. "
                f"{missing[:3]}: re-run feature extraction for this split"
            )


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
            clip_features=self.split.features.get(record.image_id),
            caption=record.references[caption_index],
            references=record.references,
        )


class CaptionImages(Dataset):
    """One item per image with all its references, in file order (evaluation and prediction)."""

    def __init__(self, split: CaptionSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split.images)

    def __getitem__(self, index: int) -> CaptionSample:
        record = self.split.images[index]
        return CaptionSample(
            image_id=record.image_id,
            clip_features=self.split.features.get(record.image_id),
            caption=None,
            references=record.references,
        )


class CaptionDataModule(pl.LightningDataModule):
    """The base of every captioning datamodule: subclasses only say how to load a split.

    Args:
        batch_size: training batch size (pairs).
        eval_batch_size: images per validation/test/predict batch; ``batch_size`` when None.
        num_workers: dataloader worker processes.
        pin_memory: pin host memory for faster copies to the GPU.
        predict_split: the split ``predict`` captions.
    """

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        predict_split: str = "test",
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.predict_split = predict_split
        self.splits: dict[str, CaptionSplit] = {}

    @abstractmethod
    def load_split(self, split: str) -> CaptionSplit:
        """Loads one split (``train``, ``val``, ``test``, ...) from disk."""

    @property
    @abstractmethod
    def clip_dim(self) -> int:
        """The CLIP feature size of this data, read without loading the features (linked to the model)."""

    def split(self, name: str) -> CaptionSplit:
        if name not in self.splits:
            self.splits[name] = self.load_split(name)
        return self.splits[name]

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
        return self._loader(CaptionPairs(self.split("train")), self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(CaptionImages(self.split("val")), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(CaptionImages(self.split("test")), self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(
            CaptionImages(self.split(self.predict_split)), self.eval_batch_size, shuffle=False
        )


class SyntheticCaptions(CaptionDataModule):
    """The embedded synthetic world: generated images, their references and cached tiny-CLIP features.

    Args:
        world_dir: the world's folder; the default world (built on first use) when None.
        batch_size: see ``CaptionDataModule``.
        eval_batch_size: see ``CaptionDataModule``.
        num_workers: see ``CaptionDataModule``.
        pin_memory: see ``CaptionDataModule``.
        predict_split: see ``CaptionDataModule``.
    """

    def __init__(
        self,
        world_dir: str | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        predict_split: str = "test",
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, predict_split)
        self.world_dir = world_dir
        self._annotations: dict[str, list[ImageRecord]] | None = None

    @property
    def world(self) -> Path:
        from clipcap.synthetic.world import ensure_world

        return ensure_world(Path(self.world_dir) if self.world_dir else None)

    def prepare_data(self) -> None:
        self.world  # noqa: B018 - builds the world once, on rank 0, if it is absent

    def _records(self, split: str) -> list[ImageRecord]:
        if self._annotations is None:
            path = self.world / "annotations.json"
            images = json.loads(path.read_text())["images"]
            self._annotations = {}
            for entry in images:
                record = ImageRecord(entry["image_id"], list(entry["captions"]))
                self._annotations.setdefault(entry["split"], []).append(record)
        if split not in self._annotations:
            raise ValueError(
                f"the synthetic world has no split {split!r}; it has {sorted(self._annotations)}"
            )
        return self._annotations[split]

    def load_split(self, split: str) -> CaptionSplit:
        features = FeatureCache.open(
            self.world / "features" / split, expect={"dataset": "synthetic", "split": split}
        )
        return CaptionSplit(features=features, images=self._records(split))

    @property
    def clip_dim(self) -> int:
        return int(json.loads((self.world / "features" / "train" / "meta.json").read_text())["dim"])
