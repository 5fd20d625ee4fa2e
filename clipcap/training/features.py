"""``clipcap features``: extract and cache the frozen-CLIP image features of a config's dataset.

The datamodule of a training config says everything extraction needs (annotation files, image folders,
``features_dir``, ``clip_model``), so the same file drives both::

    clipcap features --config lightning_configs/coco/ce.yaml [--splits train,val,test] [--grid]
    clipcap fit      --config lightning_configs/coco/ce.yaml

Each image is encoded once, however many captions it has. Extraction is batched, resumable (run the same
command again after an interruption and it continues where it stopped) and shardable (``--shard K/N`` in N
processes or on N GPUs; the last one to finish assembles the cache). It ends by writing ``summary.json`` in
``features_dir``: per split, the images, captions, dropped empty captions and skipped files with reasons.

When ``clip_model`` names a BLIP captioning checkpoint, the features are its frozen vision encoder's, for
``clipcap.blip.BlipCaptioner`` (``--grid`` is then required; see docs/blip.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from clipcap.data.images import DEFAULT_MAX_PIXELS
from clipcap.training.data import CaptionDataModule

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_datamodule(config_file: str, overrides: list[str]) -> CaptionDataModule:
    """Builds only the ``data`` section of a training config (the model is never loaded).

    Args:
        config_file: a YAML config as ``clipcap fit`` takes it.
        overrides: ``--data.init_args.<name>=<value>`` (or ``--data.<name>=<value>``) options.

    Raises:
        FileNotFoundError: the config does not exist.
        ValueError: the config has no ``data`` section.
    """
    from jsonargparse import ArgumentParser

    path = Path(config_file)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(loaded, dict) or loaded.get("data") is None:
        raise ValueError(f"{path} has no `data:` section")
    parser = ArgumentParser(prog="clipcap features", exit_on_error=False)
    parser.add_subclass_arguments(CaptionDataModule, "data", required=True)
    config = parser.parse_args(["--data", json.dumps(loaded["data"]), *overrides])
    return parser.instantiate_classes(config).data


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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of ``clipcap features``; returns the reports by split."""
    parser = argparse.ArgumentParser(
        prog="clipcap features",
        description=__doc__.splitlines()[0],
        epilog="Other options are applied to the config's data section, e.g. "
        "--data.init_args.features_dir=features/coco --data.init_args.clip_model=openai/clip-vit-large-patch14",
    )
    parser.add_argument("--config", required=True, help="the training config whose data to extract")
    parser.add_argument("--splits", default=None, help="comma-separated splits (default: the dataset's)")
    parser.add_argument("--clip", default=None, help="CLIP to extract with (default: data.clip_model)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--num_workers", type=int, default=0, help="image-decoding worker processes")
    parser.add_argument(
        "--device",
        default=None,
        help="cuda, cuda:1, cpu... (default: cuda:$LOCAL_RANK if a GPU is seen, else cpu)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(_DTYPES),
        help="autocast precision of the CLIP forward pass (weights stay float32, so the cache's CLIP "
        "fingerprint matches the one training checks)",
    )
    parser.add_argument(
        "--grid",
        action="store_true",
        help="also cache the (G, D) patch-token features (needed by a BLIP captioner: its vision sequence)",
    )
    parser.add_argument(
        "--grid_dtype",
        default="float32",
        choices=["float32", "float16"],
        help="storage of the grid features; float16 halves the cache (BLIP-base: 577x768 values an image)",
    )
    parser.add_argument(
        "--shard",
        default=None,
        help="K/N: this process does every N-th chunk from K; `auto` takes RANK/WORLD_SIZE from torchrun",
    )
    parser.add_argument(
        "--max_pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="refuse images with more pixels (decompression bombs); 0 disables the limit",
    )
    parser.add_argument("--force", action="store_true", help="re-extract caches that are up to date")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    shard = parse_shard(args.shard)

    try:
        return _extract(args, overrides, shard)
    except (FileNotFoundError, ValueError) as error:  # AnnotationError, FeatureCacheMismatch, bad options
        raise SystemExit(f"clipcap features: {error}") from error


def _extract(args: argparse.Namespace, overrides: list[str], shard: tuple[int, int] | None) -> dict[str, Any]:
    from clipcap.blip.encoder import BlipImageEncoder
    from clipcap.features.encoders import load_image_encoder
    from clipcap.features.extract import extract_entries, write_summary

    datamodule = build_datamodule(args.config, overrides)
    clip_name = args.clip or datamodule.clip_model
    if clip_name is None:
        raise SystemExit(
            "clipcap features: no CLIP to extract with: set data.init_args.clip_model in the config or "
            "pass --clip"
        )
    if args.clip and datamodule.clip_model and args.clip != datamodule.clip_model:
        logger.warning(
            "extracting with --clip %s while the config trains with data.init_args.clip_model=%s: "
            "training will refuse these features",
            args.clip,
            datamodule.clip_model,
        )
    device = args.device
    if device is None:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    encoder = load_image_encoder(clip_name)  # a CLIP, or BLIP's vision encoder for a BLIP checkpoint
    if isinstance(encoder, BlipImageEncoder) and not args.grid:
        raise SystemExit(
            f"clipcap features: {clip_name} is a BLIP checkpoint, whose text decoder reads its vision "
            "encoder's whole output sequence: pass --grid (and --grid_dtype float16 to halve the cache)"
        )
    encoder = encoder.to(device)
    precision = _DTYPES[args.dtype]
    autocast = (
        torch.autocast(device_type=torch.device(device).type, dtype=precision)
        if precision != torch.float32
        else contextlib.nullcontext()
    )
    splits = args.splits.split(",") if args.splits else list(datamodule.splits_available)
    reports = {}
    dropped = {}
    notes = {}
    for split in splits:
        annotations = datamodule.annotations(split)
        dropped[split] = annotations.dropped_empty_captions
        notes[split] = annotations.notes
        with autocast:
            reports[split] = extract_entries(
                encoder,
                annotations.entries,
                datamodule.feature_folder(split),
                dataset=datamodule.dataset_name,
                split=split,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                grid=args.grid,
                grid_dtype=args.grid_dtype,
                shard=shard,
                progress=not args.no_progress,
                max_pixels=args.max_pixels or None,
                force=args.force,
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
