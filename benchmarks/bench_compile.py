"""``PrefixLM(compile=...)``: a cross-entropy training step eager and through ``torch.compile``.

For the GPT-2 shapes of ``bench_captioner.py`` (random weights), the MLP mapper with a finetuned LM, batch
32, captions of exactly 20 tokens: samples/s of the full step (tokenize, forward, backward, fused AdamW),
eager and compiled (``torch.compile`` defaults, inductor, ``dynamic=True``), and how long the compiled
model's first steps took (the compilation).

Run:
    .venv/bin/python -m benchmarks.bench_compile [--shapes small,gpt2-small] [--threads 1] [--device cpu|cuda]
        [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_captioner import (
    CLIP_DIM,
    PREFIX_LENGTH,
    SHAPES,
    TRAIN_BATCH,
    command_line,
    figure,
    load_average,
    machine_description,
    quiet_libraries,
    run_lines,
    save_random_gpt2,
    synchronize,
    training_captions,
    write_markdown,
)
from clipcap.captioner import ClipCaptioner
from clipcap.data.batch import CaptionBatch
from clipcap.lm import PrefixLM
from clipcap.mapper import MLPMapper
from clipcap.objectives import CrossEntropy

WARMUP = 2  # the compiled model compiles during these
STEPS = 3


def bench(folder: Path, compile: bool, device: torch.device) -> tuple[float, float]:
    """(samples/s, seconds of the warm-up steps)."""
    torch.manual_seed(0)
    captioner = ClipCaptioner(
        PrefixLM(str(folder), trainable=True, compile=compile),
        functools.partial(MLPMapper, prefix_length=PREFIX_LENGTH),
        clip_dim=CLIP_DIM,
    ).to(device)
    captioner.train()
    optimizer = torch.optim.AdamW(captioner.parameters(), lr=1e-5, fused=True)
    captions = training_captions(captioner.tokenizer, TRAIN_BATCH)
    batch = CaptionBatch(
        [str(i) for i in range(TRAIN_BATCH)], torch.randn(TRAIN_BATCH, CLIP_DIM, device=device), captions
    )
    objective = CrossEntropy()

    def step() -> float:
        synchronize(device)
        start = time.perf_counter()
        objective(captioner, batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - start

    warmup = sum(step() for _ in range(WARMUP))
    return TRAIN_BATCH / statistics.median(step() for _ in range(STEPS)), warmup


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="small,gpt2-small")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--write", type=Path, default=None, help="write the block into this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_libraries()
    device = torch.device(args.device)
    load_before = load_average()
    rows = [
        "| shape | eager | compiled | speed-up | compiled model's first two steps |",
        "|---|---:|---:|---:|---:|",
    ]
    for shape in args.shapes.split(","):
        with tempfile.TemporaryDirectory() as folder:
            save_random_gpt2(SHAPES[shape], Path(folder))
            eager, _ = bench(Path(folder), False, device)
            compiled, warmup = bench(Path(folder), True, device)
        rows.append(
            f"| {shape} | {figure(eager)} samples/s | {figure(compiled)} samples/s | "
            f"{compiled / eager:.2f}× | {figure(warmup)} s |"
        )
        print(rows[-1], flush=True)
    block = "\n".join(
        [
            f"### torch.compile, cross-entropy training, {args.device}",
            "",
            *run_lines(
                command_line(__file__, argv),
                machine_description(device, "float32", args.threads),
                load_before,
            ),
            f"- MLP mapper + finetuned LM, batch {TRAIN_BATCH}, captions of 20 tokens, fused AdamW; "
            f"`PrefixLM(compile=True)` (inductor, dynamic=True); median of {STEPS} steps after {WARMUP}",
            "",
            *rows,
        ]
    )
    print(block)
    if args.write:
        write_markdown(args.write, f"compile-{args.device}", block)


if __name__ == "__main__":
    main()
