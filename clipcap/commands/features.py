"""``clipcap features``: extract and cache the frozen-CLIP image features of a config's dataset.

The datamodule of a training config says everything extraction needs (annotation files, image folders,
``features_dir``, ``clip_model``), so the same file drives both, read by the same parser (several
``--config`` files, OmegaConf interpolation and dotted overrides mean the same to both)::

    clipcap features --config lightning_configs/data/coco_karpathy.yaml [--splits train,val,test] [--grid]
    clipcap fit      --config lightning_configs/data/coco_karpathy.yaml --config lightning_configs/coco/ce.yaml

Each image is encoded once, however many captions it has. Extraction is batched, resumable (run the same
command again after an interruption and it continues where it stopped) and shardable (``--shard K/N`` in N
processes or on N GPUs; the last one to finish assembles the cache). It ends by writing ``summary.json`` in
``features_dir``: per split, the images, captions, dropped empty captions and skipped files with reasons.

When ``clip_model`` names a BLIP captioning checkpoint, the features are its frozen vision encoder's, for
``clipcap.blip.BlipCaptioner`` (``--grid`` is then required; see docs/blip.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Literal

import torch

from clipcap.blip.encoder import BlipImageEncoder
from clipcap.commands.parsing import add_function_options, call_with
from clipcap.data.images import DEFAULT_MAX_PIXELS
from clipcap.features.encoders import load_image_encoder
from clipcap.features.extract import ExtractionReport, extract_entries, write_summary
from clipcap.training.cli import DataOnlyCLI
from clipcap.training.data import CaptionDataModule

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_datamodule(argv: list[str]) -> CaptionDataModule:
    """Builds only the datamodule of a training config given as ``clipcap fit`` takes it (``--config``
    files and overrides); the model is never loaded."""
    return DataOnlyCLI(argv, add_options=lambda parser: None, prog="clipcap features").datamodule


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"K/N"`` → ``(K, N)`` with 0 ≤ K < N; ``"auto"`` → ``(RANK, WORLD_SIZE)`` as ``torchrun`` sets
    them (None outside ``torchrun``); None stays None."""
    if text is None:
        return None
    if text == "auto":
        if "WORLD_SIZE" not in os.environ:
            return None
        return int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like K/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {text}: need 0 ≤ K < N")
    return index, count


def features(
    datamodule: CaptionDataModule,
    splits: str | None = None,
    clip: str | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | None = None,
    dtype: Literal["float32", "float16", "bfloat16"] = "float32",
    grid: bool = False,
    grid_dtype: Literal["float32", "float16"] = "float32",
    shard: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    force: bool = False,
    progress: bool = True,
) -> dict[str, ExtractionReport]:
    """Extract and cache the frozen-CLIP image features of a training config's dataset.

    Args:
        datamodule: the config's data (built from ``--config`` and ``--data.*``, as ``clipcap fit`` builds it)
        splits: comma-separated splits (default: the dataset's)
        clip: CLIP to extract with (default: data.clip_model)
        batch_size: images per forward pass
        num_workers: image-decoding worker processes
        device: cuda, cuda:1, cpu... (default: cuda:$LOCAL_RANK if a GPU is seen, else cpu)
        dtype: autocast precision of the CLIP forward pass (weights stay float32, so the cache's CLIP
            fingerprint matches the one training checks)
        grid: also cache the (G, D) patch-token features (needed by a BLIP captioner: its vision sequence)
        grid_dtype: storage of the grid features; float16 halves the cache (BLIP-base: 577x768 values an image)
        shard: K/N: this process does every N-th chunk from K; ``auto`` takes RANK/WORLD_SIZE from torchrun
        max_pixels: refuse images with more pixels (decompression bombs); 0 disables the limit
        force: re-extract caches that are up to date
        progress: show a progress bar

    Returns:
        The extraction report of each split.

    Raises:
        ValueError: no CLIP to extract with, a BLIP checkpoint without ``grid``, a malformed ``shard``.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    shard_of = parse_shard(shard)
    clip_name = clip or datamodule.clip_model
    if clip_name is None:
        raise ValueError(
            "no CLIP to extract with: set data.init_args.clip_model in the config or pass --clip"
        )
    if clip and datamodule.clip_model and clip != datamodule.clip_model:
        logger.warning(
            "extracting with --clip %s while the config trains with data.init_args.clip_model=%s: "
            "training will refuse these features",
            clip,
            datamodule.clip_model,
        )
    if device is None:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    encoder = load_image_encoder(clip_name)  # a CLIP, or BLIP's vision encoder for a BLIP checkpoint
    if isinstance(encoder, BlipImageEncoder) and not grid:
        raise ValueError(
            f"{clip_name} is a BLIP checkpoint, whose text decoder reads its vision encoder's whole output "
            "sequence: pass --grid (and --grid_dtype float16 to halve the cache)"
        )
    encoder = encoder.to(device)
    precision = _DTYPES[dtype]
    autocast = (
        torch.autocast(device_type=torch.device(device).type, dtype=precision)
        if precision != torch.float32
        else contextlib.nullcontext()
    )
    options = {
        "batch_size": batch_size,
        "num_workers": num_workers,
        "grid": grid,
        "grid_dtype": grid_dtype,
        "shard": shard_of,
        "progress": progress,
        "max_pixels": max_pixels or None,
        "force": force,
    }
    reports = {}
    dropped = {}
    notes = {}
    for split in splits.split(",") if splits else list(datamodule.splits_available):
        annotations = datamodule.annotations(split)
        dropped[split] = annotations.dropped_empty_captions
        notes[split] = annotations.notes
        with autocast:
            folder = datamodule.feature_folder(split)
            reports[split] = extract_entries(
                encoder, annotations.entries, folder, dataset=datamodule.dataset_name, split=split, **options
            )
        report = reports[split]
        print(
            f"[features] {datamodule.dataset_name}/{split}: {report.extracted} of {report.images} images, "
            f"{len(report.skipped)} skipped, {report.seconds:.1f}s"
            + ("" if report.complete else " (this shard's part; the cache is assembled by the last shard)")
        )
    summary = write_summary(
        datamodule.features_dir,
        list(reports.values()),
        dropped_empty_captions=dropped,
        annotation_notes=notes,
    )
    print(f"[features] summary: {summary}")
    return reports


def main(argv: list[str]) -> dict[str, ExtractionReport]:
    """``clipcap features --config FILE [--config FILE...] [--data.*=...] [extraction options]``."""
    cli = DataOnlyCLI(
        argv,
        add_options=lambda parser: add_function_options(parser, features, skip=("datamodule",)),
        prog="clipcap features",
    )
    return call_with(features, cli.config, datamodule=cli.datamodule)
