"""``clipcap caption --ckpt CKPT IMAGE...``: caption image files with a trained checkpoint.

The images go through the CLIP the captioner was trained on (recorded in the checkpoint's datamodule
hyperparameters, or ``--clip``), batched; each line printed is ``<image>\\t<caption>``, followed by the
CLIPScore when ``--clip_score`` is given::

    clipcap caption --ckpt runs/coco_ce/.../best.ckpt photos/*.jpg --num_beams 5 --clip_score

Captions are decoded as ``clipcap test`` decodes them: the test decoding the checkpoint records (its
``CaptionEvaluation``), else the module's decoding; every ``DecodingConfig`` field can be overridden
(``--num_beams 3 --stop_at_period true``). The decoding used is printed on stderr. Images that cannot be read
are reported there too; the others are captioned, and the command exits 1 if any image failed.
"""

from __future__ import annotations

import dataclasses
import json as _json
import sys
import typing
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser

from clipcap.checkpoints import read_checkpoint
from clipcap.commands.parsing import call_with, function_parser
from clipcap.data.images import ImageReadError, load_image
from clipcap.features.encoders import load_image_encoder
from clipcap.generation import DecodingConfig
from clipcap.metrics.clip_scores import clip_score as clip_score_of
from clipcap.metrics.clip_scores import prompted
from clipcap.training.evaluation import TEST_DECODING_KEY
from clipcap.training.module import CaptionModule


def checkpoint_clip(checkpoint: dict[str, Any]) -> tuple[str | None, bool]:
    """The data's ``clip_model`` and ``grid_features`` recorded in a checkpoint, if any."""
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    return data.get("clip_model"), bool(data.get("grid_features", False))


def checkpoint_test_decoding(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The test decoding a checkpoint's ``CaptionEvaluation`` recorded, or None (no such callback, or a
    checkpoint written before it was recorded)."""
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and isinstance(state.get(TEST_DECODING_KEY), dict):
            return state[TEST_DECODING_KEY]
    return None


def caption_images(
    checkpoint_path: str,
    images: list[str],
    clip: str | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    decoding_overrides: dict[str, Any] | None = None,
    clip_score: bool = False,
) -> list[dict[str, Any]]:
    """Captions image files; returns one row per image in the order given: ``{"image", "caption",
    "clip_score"?}``, or ``{"image", "error"}`` for an image that cannot be read.

    Raises:
        FileNotFoundError, clipcap.checkpoints.CheckpointError: the checkpoint is missing, unreadable or
            unsafe.
        ValueError: no CLIP is known, or its feature size does not fit the checkpoint's mapper, or a
            decoding override is invalid.
    """
    checkpoint = read_checkpoint(checkpoint_path, "--ckpt")
    recorded_clip, grid = checkpoint_clip(checkpoint)
    clip_name = clip or recorded_clip
    if clip_name is None:
        raise ValueError(
            f"{checkpoint_path} does not record the CLIP its features came from; pass --clip NAME"
        )
    module = CaptionModule.load_from_checkpoint(checkpoint_path, map_location=device, weights_only=True)
    module.eval()
    recorded = checkpoint_test_decoding(checkpoint)
    known = {field.name for field in dataclasses.fields(DecodingConfig)}
    base = (
        DecodingConfig(**{k: v for k, v in recorded.items() if k in known})
        if recorded is not None
        else module.decoding
    )
    decoding = dataclasses.replace(base, **(decoding_overrides or {}))
    source = "the checkpoint's test decoding" if recorded is not None else "the checkpoint's model.decoding"
    changed = f", with {sorted(decoding_overrides)} from the command line" if decoding_overrides else ""
    print(f"[clipcap caption] decoding: {decoding.describe()} ({source}{changed})", file=sys.stderr)
    encoder = load_image_encoder(clip_name).to(device)  # BLIP's vision encoder for a BLIP captioner
    if clip_score and not hasattr(encoder, "encode_text"):
        raise ValueError(
            f"--clip_score needs a CLIP to read the captions, and {clip_name!r} is not one (a BLIP "
            "captioner's image encoder has no text tower)"
        )
    if encoder.dim != module.captioner.clip_dim:
        raise ValueError(
            f"CLIP {clip_name!r} gives {encoder.dim}-d features but the checkpoint's mapper takes "
            f"{module.captioner.clip_dim}-d ones: pass the CLIP it was trained with (--clip)"
        )
    rows: dict[str, dict[str, Any]] = {}
    readable: list[tuple[str, Any]] = []
    for path in images:
        try:
            readable.append((path, load_image(path, Path(path).name)))
        except ImageReadError as error:
            rows[path] = {"image": path, "error": error.reason}
    for start in range(0, len(readable), batch_size):
        batch = readable[start : start + batch_size]
        pixels = encoder.preprocess([image for _, image in batch])
        with torch.no_grad():
            if grid:
                pooled, features = encoder.encode_images_and_grid(pixels)
            else:
                pooled = features = encoder.encode_images(pixels)
            captions = [texts[0] for texts in module.captioner.generate(features, decoding)]
            scores: list[float | None] = [None] * len(captions)
            if clip_score:  # only then: a BLIP captioner's encoder cannot score
                texts = [prompted("A photo depicts", c) for c in captions]
                scores = clip_score_of(pooled, encoder.encode_text(texts)).tolist()
        for (path, _), caption, score in zip(batch, captions, scores, strict=True):
            row: dict[str, Any] = {"image": path, "caption": caption}
            if clip_score:
                row["clip_score"] = score
            rows[path] = row
    return [rows[path] for path in images]


def caption(
    images: list[str],
    ckpt: str,
    clip: str | None = None,
    device: str | None = None,
    batch_size: int = 32,
    clip_score: bool = False,
    json: bool = False,
    decoding_overrides: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Caption image files with a trained checkpoint.

    Args:
        images: image files (JPEG, PNG, ...)
        ckpt: a checkpoint written by ``clipcap fit``
        clip: the CLIP to encode with (default: the checkpoint's)
        device: cuda, cpu... (default: cuda if a GPU is seen, else cpu)
        batch_size: images per forward pass
        clip_score: also print each caption's CLIPScore
        json: print one JSON list instead of lines
        decoding_overrides: ``DecodingConfig`` fields to change (``--num_beams 3 --stop_at_period true``)

    Raises:
        SystemExit: status 1 when any image could not be captioned (the others are printed).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = caption_images(ckpt, images, clip, device, batch_size, decoding_overrides, clip_score)
    captioned = [row for row in results if "caption" in row]
    failed = [row for row in results if "error" in row]
    if json:
        print(_json.dumps(captioned, indent=1, ensure_ascii=False))
    else:
        for row in captioned:
            score = f"\t{row['clip_score']:.4f}" if "clip_score" in row else ""
            print(f"{row['image']}\t{row['caption']}{score}")
    for row in failed:
        print(f"clipcap caption: cannot read {row['image']}: {row['error']}", file=sys.stderr)
    if failed:
        print(
            f"clipcap caption: {len(failed)} of {len(results)} images could not be captioned", file=sys.stderr
        )
        raise SystemExit(1)
    return results


def add_decoding_options(parser: ArgumentParser) -> list[str]:
    """Adds one ``--<field>`` option per ``DecodingConfig`` field (default: not given, so the checkpoint's
    test decoding applies); returns their names."""
    group = parser.add_argument_group("decoding (default: the checkpoint's test decoding)")
    hints = typing.get_type_hints(DecodingConfig)
    for field in dataclasses.fields(DecodingConfig):
        group.add_argument(f"--{field.name}", type=hints[field.name] | None, default=None)
    return [field.name for field in dataclasses.fields(DecodingConfig)]


def main(argv: list[str]) -> list[dict[str, Any]]:
    """``clipcap caption --ckpt CKPT IMAGE... [--clip_score] [--<decoding field> VALUE]``."""
    parser = function_parser(caption, "clipcap caption", positional=("images",), skip=("decoding_overrides",))
    fields = add_decoding_options(parser)
    config = parser.parse_args(argv)
    overrides = {name: config[name] for name in fields if config[name] is not None}
    return call_with(caption, config, decoding_overrides=overrides)
