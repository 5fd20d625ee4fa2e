"""Data benchmarks: CLIP feature extraction images/s, and the cached-feature loader against training.

Measures, in the synthetic world (built on first use):

1. feature extraction images/s with the world's tiny CLIP (``clipcap.features.extract_entries``: PNG
   decoding, CLIP preprocessing, the vision tower, chunked writes), for ``--workers`` decoding processes;
2. the training data loader's samples/s from the feature cache (``SyntheticCaptions.train_dataloader``:
   (image, caption) pairs, memory-mapped features, collation), one full epoch;
3. what cross-entropy training consumes, samples/s: full steps of the demo's captioner (tiny GPT-2 finetuned,
   MLP mapper) on batches from that loader; the loader must deliver at least 10× this.

Run:
    .venv/bin/python -m benchmarks.bench_data [--images 1000] [--workers 0,2] [--threads 1] [--device cpu]
        [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.bench_captioner import (
    figure,
    load_average,
    machine_description,
    quiet_libraries,
    run_lines,
    write_markdown,
)
from clipcap.captioner import ClipCaptioner
from clipcap.clip import ClipEncoder
from clipcap.data.records import ImageEntry
from clipcap.features.encoders import ImageEncoder
from clipcap.features.extract import extract_entries
from clipcap.lm import PrefixLM
from clipcap.mapper import MLPMapper
from clipcap.objectives import CrossEntropy
from clipcap.synthetic.world import CLIP_DIR, ensure_world
from clipcap.training import SyntheticCaptions

LOADER_TARGET = 10.0  # the loader must deliver at least this many times what training consumes
TRAIN_BATCH = 64


def bench_extraction(
    world: Path, images: int, workers: int, device: str, batch_size: int
) -> tuple[float, int]:
    """Images/s of a fresh extraction of ``images`` training images (nothing cached beforehand)."""
    encoder = ClipEncoder(str(world / CLIP_DIR)).to(device)
    entries = SyntheticCaptions(world_dir=str(world)).entries("train")[:images]
    return time_extraction(encoder, entries, workers, batch_size)


def time_extraction(
    encoder: ImageEncoder, entries: Sequence[ImageEntry], workers: int, batch_size: int
) -> tuple[float, int]:
    """Images/s and images extracted of a fresh ``extract_entries`` run (what ``clipcap features`` does)
    into a temporary cache: decoding, preprocessing, the vision tower and the cache writes, all timed."""
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        report = extract_entries(
            encoder,
            entries,
            Path(folder) / "train",
            dataset="synthetic",
            split="train",
            batch_size=batch_size,
            num_workers=workers,
            progress=False,
        )
        seconds = time.perf_counter() - started
    return report.extracted / seconds, report.extracted


def bench_loader(world: Path) -> tuple[float, int]:
    """Samples/s of one full epoch of the training loader (pairs), with collation."""
    datamodule = SyntheticCaptions(world_dir=str(world), batch_size=TRAIN_BATCH)
    loader = datamodule.train_dataloader()
    started = time.perf_counter()
    samples = sum(len(batch) for batch in loader)
    return samples / (time.perf_counter() - started), samples


def bench_training(world: Path, device: str, steps: int) -> float:
    """Samples/s of full cross-entropy steps on the demo's captioner, fed by the real loader."""
    datamodule = SyntheticCaptions(world_dir=str(world), batch_size=TRAIN_BATCH)
    torch.manual_seed(0)
    captioner = ClipCaptioner(
        PrefixLM(str(world / "lm"), trainable=True),
        functools.partial(MLPMapper, prefix_length=8),
        clip_dim=datamodule.clip_dim,
        max_caption_tokens=32,
    ).to(device)
    objective = CrossEntropy()
    optimizer = torch.optim.AdamW(captioner.parameters(), lr=1e-3, fused=True)
    batches = iter(datamodule.train_dataloader())
    times = []
    for step in range(steps + 1):
        batch = next(batches)
        started = time.perf_counter()
        batch.clip_features = batch.clip_features.to(device)
        loss = objective(captioner, batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step warms up
            times.append(time.perf_counter() - started)
    times.sort()
    return TRAIN_BATCH / times[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="images extracted per timing")
    parser.add_argument("--workers", default="0,2", help="comma-separated decoding worker counts")
    parser.add_argument("--batch_size", type=int, default=64, help="extraction batch size")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--write", type=Path, default=None, help="write the block into this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_libraries()
    world = ensure_world()
    load_before = load_average()

    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        rate, count = bench_extraction(world, args.images, workers, args.device, args.batch_size)
        rows.append(
            (
                "feature extraction (tiny CLIP, 64 px PNG)",
                f"{workers} decoding workers",
                f"{figure(rate)} images/s",
            )
        )
        print(f"extraction, {workers} workers: {rate:.1f} images/s ({count} images)", flush=True)
    loader_rate, samples = bench_loader(world)
    print(f"loader: {loader_rate:.0f} samples/s ({samples} samples)", flush=True)
    training_rate = bench_training(world, args.device, args.steps)
    print(f"cross-entropy training: {training_rate:.1f} samples/s", flush=True)
    ratio = loader_rate / training_rate
    verdict = "met" if ratio >= LOADER_TARGET else "not met"
    rows.append(
        (
            "training loader from the cache",
            f"pairs, batch {TRAIN_BATCH}, 0 workers",
            f"{figure(loader_rate)} samples/s",
        )
    )
    rows.append(
        (
            "cross-entropy training consumes",
            f"demo captioner, batch {TRAIN_BATCH}",
            f"{figure(training_rate)} samples/s",
        )
    )
    print(f"loader / training = {ratio:.0f}× (target ≥ {LOADER_TARGET:.0f}×: {verdict})")

    command = "python -m benchmarks.bench_data " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    block = "\n".join(
        [
            f"### Data, {args.device}",
            "",
            *run_lines(
                command.strip(),
                machine_description(torch.device(args.device), "float32", args.threads),
                load_before,
            ),
            "",
            "| measurement | setting | throughput |",
            "|---|---|---:|",
            *(f"| {a} | {b} | {c} |" for a, b, c in rows),
            "",
            f"Loader over training: {ratio:.0f}× (target ≥ {LOADER_TARGET:.0f}×: {verdict}).",
        ]
    )
    print(block)
    if args.write:
        write_markdown(args.write, f"data-{args.device}", block)


if __name__ == "__main__":
    main()
