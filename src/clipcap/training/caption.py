"""``clipcap caption --ckpt CKPT IMAGE...``: caption image files with a trained checkpoint.

The images go through the CLIP the captioner was trained on (recorded in the checkpoint's datamodule
hyperparameters, or ``--clip``), batched; each line printed is ``<image>\\t<caption>``, followed by the
CLIPScore when ``--clip_score`` is given::

    clipcap caption --ckpt runs/coco_ce/.../best.ckpt photos/*.jpg --num_beams 5 --clip_score
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch


def checkpoint_clip(checkpoint: dict[str, Any]) -> tuple[str | None, bool]:
    """The data's ``clip_model`` and ``grid_features`` recorded in a checkpoint, if any."""
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    return data.get("clip_model"), bool(data.get("grid_features", False))


def caption_images(
    checkpoint_path: str,
    images: list[str],
    clip: str | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    decoding_overrides: dict[str, Any] | None = None,
    clip_score: bool = False,
) -> list[dict[str, Any]]:
    """Captions image files; returns ``[{"image", "caption", "clip_score"?}]`` in the order given.

    Raises:
        ValueError: no CLIP is known, or its feature size does not fit the checkpoint's mapper.
        clipcap.data.images.ImageReadError: an image cannot be read (its path and reason are named).
    """
    from dataclasses import replace

    from clipcap.data.images import load_image
    from clipcap.features.encoders import load_image_encoder
    from clipcap.metrics.clip_scores import clip_score as clip_score_of
    from clipcap.training.module import CaptionModule

    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    recorded_clip, grid = checkpoint_clip(checkpoint)
    clip_name = clip or recorded_clip
    if clip_name is None:
        raise ValueError(
            f"{checkpoint_path} does not record the CLIP its features came from; pass --clip NAME"
        )
    module = CaptionModule.load_from_checkpoint(checkpoint_path, map_location=device, weights_only=False)
    module.eval()
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
    decoding = replace(module.decoding, **(decoding_overrides or {}))
    results: list[dict[str, Any]] = []
    for start in range(0, len(images), batch_size):
        paths = images[start : start + batch_size]
        pixels = encoder.preprocess([load_image(path, Path(path).name) for path in paths])
        with torch.no_grad():
            if grid:
                pooled, features = encoder.encode_images_and_grid(pixels)
            else:
                pooled = features = encoder.encode_images(pixels)
            captions = [texts[0] for texts in module.captioner.generate(features, decoding)]
            scores: list[float | None] = [None] * len(captions)
            if clip_score:  # only then: a BLIP captioner's encoder cannot score
                prompted = [f"A photo depicts {c}" for c in captions]
                scores = clip_score_of(pooled, encoder.encode_text(prompted)).tolist()
        for path, caption, score in zip(paths, captions, scores, strict=True):
            row: dict[str, Any] = {"image": path, "caption": caption}
            if clip_score:
                row["clip_score"] = score
            results.append(row)
    return results


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Entry point of ``clipcap caption``."""
    parser = argparse.ArgumentParser(prog="clipcap caption", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by `clipcap fit`")
    parser.add_argument("--clip", default=None, help="the CLIP to encode with (default: the checkpoint's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_beams", type=int, default=None, help="override the checkpoint's decoding")
    parser.add_argument("--max_new_tokens", type=int, default=None)
    parser.add_argument("--clip_score", action="store_true", help="also print each caption's CLIPScore")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of lines")
    args = parser.parse_args(argv)
    overrides = {
        key: value
        for key, value in (("num_beams", args.num_beams), ("max_new_tokens", args.max_new_tokens))
        if value is not None
    }
    from clipcap.data.images import ImageReadError

    try:
        results = caption_images(
            args.ckpt, args.images, args.clip, args.device, args.batch_size, overrides, args.clip_score
        )
    except (ValueError, ImageReadError, FileNotFoundError) as error:
        raise SystemExit(f"clipcap caption: {error}") from error
    if args.json:
        print(json.dumps(results, indent=1, ensure_ascii=False))
    else:
        for row in results:
            score = f"\t{row['clip_score']:.4f}" if "clip_score" in row else ""
            print(f"{row['image']}\t{row['caption']}{score}")
    return results
