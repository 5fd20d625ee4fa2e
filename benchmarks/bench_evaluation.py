"""Evaluation benchmark: the time to evaluate 5,000 synthetic images, split into generation and each metric.

Draws ``--images`` new scenes with the synthetic world's generator (its own seed, so none is a training
image), renders them, extracts their features with the world's CLIP, then times, on a trained checkpoint
(``make demo`` writes one):

1. caption generation (the test decoding of ``CaptionEvaluation``: beam 5, and greedy for comparison);
2. each NLG metric through pycocoevalcap, each timing including its own PTB tokenization (BLEU, METEOR,
   ROUGE-L, CIDEr; SPICE only when its jars are installed);
3. the CLIP metrics (``ClipCaptionScores``: caption and reference encoding, CLIPScore, RefCLIPScore,
   RefCompare, retrieval P@1 in blocks of 100 and with 99 random distractors, recall@1/5/10);
4. ``report.html`` with 5,000 embedded thumbnails.

Run:
    .venv/bin/python -m benchmarks.bench_evaluation [--ckpt runs/demo/.../best.ckpt] [--images 5000]
        [--threads 1] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_captioner import (
    figure,
    load_average,
    machine_description,
    quiet_libraries,
    write_markdown,
)
from clipcap.clip import ClipEncoder
from clipcap.data.records import ImageEntry
from clipcap.features import FeatureCache
from clipcap.features.extract import extract_entries
from clipcap.generation import DecodingConfig
from clipcap.metrics.caption_metrics import ClipCaptionScores
from clipcap.metrics.nlg import coco_caption_scores, spice_available
from clipcap.metrics.report import ReportRow, write_report
from clipcap.synthetic.scenes import generate_captions, generate_scene, render_scene
from clipcap.synthetic.world import CLIP_DIR, ensure_world
from clipcap.training.module import CaptionModule

BATCH = 128
SEED = "bench-evaluation"


def timed(what: str, rows: list[tuple[str, float]], fn: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    rows.append((what, seconds))
    print(f"{what}: {seconds:.1f}s", flush=True)
    return result


def default_checkpoint() -> Path:
    found = sorted(Path("runs/demo/ce").rglob("best.ckpt"), key=lambda path: path.stat().st_mtime)
    if not found:
        raise SystemExit("no checkpoint: run `make demo` first or pass --ckpt")
    return found[-1]


def make_images(folder: Path, count: int, image_size: int) -> list[ImageEntry]:
    entries = []
    for index in range(count):
        scene = generate_scene(SEED, index)
        path = folder / f"{index:06d}.png"
        render_scene(scene, image_size).save(path)
        entries.append(
            ImageEntry(f"{index:06d}", str(path), tuple(generate_captions(scene, SEED, index)), "test")
        )
    return entries


def generate(module: CaptionModule, features: torch.Tensor, decoding: DecodingConfig) -> list[str]:
    captions: list[str] = []
    for start in range(0, len(features), BATCH):
        captions += [
            texts[0] for texts in module.captioner.generate(features[start : start + BATCH], decoding)
        ]
    return captions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, default=None, help="a trained checkpoint (default: the demo's)")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", type=Path, default=None, help="write the block into this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_libraries()
    world = ensure_world()
    checkpoint = args.ckpt or default_checkpoint()
    load_before = load_average()
    rows: list[tuple[str, float]] = []

    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        encoder = ClipEncoder(str(world / CLIP_DIR))
        size = encoder.preprocess.image_size
        entries = timed(
            "render images (setup, not evaluation)", rows, lambda: make_images(folder, args.images, size)
        )
        timed(
            "extract CLIP features (setup, not evaluation)",
            rows,
            lambda: extract_entries(encoder, entries, folder / "features", "bench", "test", progress=False),
        )
        cache = FeatureCache.open(folder / "features")
        features = torch.from_numpy(cache.features[:].copy())
        module = CaptionModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=False).eval()
        with torch.no_grad():
            timed(
                "generation, greedy",
                rows,
                lambda: generate(module, features, DecodingConfig(max_new_tokens=40)),
            )
            captions = timed(
                "generation, beam 5 (test decoding)",
                rows,
                lambda: generate(module, features, DecodingConfig(num_beams=5, max_new_tokens=40)),
            )
        predictions = {entry.image_id: caption for entry, caption in zip(entries, captions, strict=True)}
        references = {entry.image_id: list(entry.references) for entry in entries}
        scores: dict[str, float] = {}
        metrics = ["BLEU", "METEOR", "ROUGE_L", "CIDEr"] + (["SPICE"] if spice_available() else [])
        for metric in metrics:
            scores.update(
                timed(
                    f"{metric} (PTB tokenization included)",
                    rows,
                    lambda metric=metric: coco_caption_scores(predictions, references, [metric]),
                )
            )

        def clip_metrics() -> tuple[dict[str, float], dict[int, dict[str, float]]]:
            metric = ClipCaptionScores(encoder, [entry.references for entry in entries])
            for start in range(0, len(entries), BATCH):
                stop = min(start + BATCH, len(entries))
                metric.update(torch.arange(start, stop), features[start:stop], captions[start:stop])
            return metric.compute(), metric.per_image()

        clip_scores, per_image = timed("CLIP metrics (all of them)", rows, clip_metrics)
        scores.update(clip_scores)
        report_rows = [
            ReportRow(e.image_id, captions[i], list(e.references), per_image.get(i, {}), e.image)
            for i, e in enumerate(entries)
        ]
        report = timed("report.html", rows, lambda: write_report(folder / "report.html", report_rows, scores))
        report_mb = report.stat().st_size / 2**20

    evaluation = [seconds for what, seconds in rows if "setup" not in what and what != "generation, greedy"]
    command = "python -m benchmarks.bench_evaluation " + " ".join(
        shlex.quote(a) for a in (argv or sys.argv[1:])
    )
    block = "\n".join(
        [
            "### Evaluation, cpu",
            "",
            f"- Command: `{command.strip()}` on `{checkpoint}`",
            f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- Machine: {machine_description(torch.device('cpu'), 'float32', args.threads)}",
            f"- Load: 1-minute load average {load_before} at start, {load_average()} at end",
            f"- {args.images} images; batches of {BATCH}; report.html {report_mb:.1f} MB",
            "",
            "| step | seconds |",
            "|---|---:|",
            *(f"| {what} | {figure(seconds)} |" for what, seconds in rows),
            f"| **evaluation total** (beam-5 generation, every metric, report) | **{figure(sum(evaluation))}** |",
            "",
            "Scores of this run: "
            + ", ".join(f"{key} {value:.3f}" for key, value in sorted(scores.items()) if "/" not in key),
        ]
    )
    print(block)
    if args.write:
        write_markdown(args.write, "evaluation-cpu", block)


if __name__ == "__main__":
    main()
