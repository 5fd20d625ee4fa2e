"""The LM head on the caption positions: hidden states sliced by a count (non-contiguous) against gathered
by a tensor of positions (contiguous), forward and backward, measured side by side in one run.

A captioner's teacher-forced pass needs logits only at the caption positions (``logits_to_keep``).
Given a count, transformers slices the hidden states ``[:, -k:]``, a non-contiguous view, and on CPU the
head's matrix product then runs as one small product per row; given the positions as a tensor it gathers
them into a contiguous tensor first and the head is one matrix product (what ``PrefixLM`` passes). For the
GPT-2 shapes of ``bench_captioner.py`` (random weights, frozen LM, as with the Transformer mapper), batch 32,
10 prefix + 20 caption positions, the input embeddings requiring gradients as a mapper's output does.
Rounds alternate the two ways; the median of each is reported.

Run:
    .venv/bin/python -m benchmarks.bench_lm_head [--shapes small,gpt2-small] [--rounds 5] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_captioner import (
    SHAPES,
    figure,
    load_average,
    publish_side_by_side,
    quiet_libraries,
    save_random_gpt2,
)
from clipcap.lm import PrefixLM

BATCH, PREFIX, CAPTION = 32, 10, 20


def bench_shape(shape_name: str, rounds: int) -> dict[str, float]:
    """Median seconds of forward + backward with the count and with the positions, and their max logit
    difference."""
    with tempfile.TemporaryDirectory() as folder:
        save_random_gpt2(SHAPES[shape_name], Path(folder))
        lm = PrefixLM(folder, trainable=False)
    torch.manual_seed(0)
    length = PREFIX + CAPTION
    keep = CAPTION + 1
    embeds = torch.randn(BATCH, length, lm.model.config.n_embd, requires_grad=True)
    mask = torch.ones(BATCH, length, dtype=torch.long)
    ways = {
        "count": keep,
        "positions": torch.arange(length - keep, length),
    }

    def run(way: str) -> tuple[float, torch.Tensor]:
        started = time.perf_counter()
        logits = lm.model(
            inputs_embeds=embeds, attention_mask=mask, use_cache=False, logits_to_keep=ways[way]
        ).logits
        logits.float().logsumexp(-1).sum().backward()
        seconds = time.perf_counter() - started
        embeds.grad = None
        return seconds, logits.detach()

    outputs = {way: run(way)[1] for way in ways}  # warm-up
    difference = float((outputs["count"] - outputs["positions"]).abs().max())
    times: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(rounds):
        for way in ways:
            times[way].append(run(way)[0])
    return {**{way: statistics.median(values) for way, values in times.items()}, "difference": difference}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="small,gpt2-small")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    quiet_libraries()
    load_before = load_average()
    lines = [
        "| shape | count (sliced, before) | positions (gathered, now) | speed-up | max logit difference |",
        "|---|---:|---:|---:|---:|",
    ]
    for shape in args.shapes.split(","):
        result = bench_shape(shape, args.rounds)
        lines.append(
            f"| {shape} | {figure(result['count'])} s | {figure(result['positions'])} s | "
            f"{result['count'] / result['positions']:.2f}× | {result['difference']:.1e} |"
        )
        print(lines[-1], flush=True)
    publish_side_by_side(
        "### LM head on the caption positions: sliced by a count against gathered by positions",
        __file__,
        argv,
        load_before,
        (
            f"Frozen LM, batch {BATCH}, {PREFIX} prefix + {CAPTION} caption positions, logits kept for"
            f" {CAPTION + 1}; forward and backward to the input embeddings; median of {args.rounds} alternating"
            " rounds after a warm-up"
        ),
        lines,
        args.write,
        "lm-head-cpu",
    )


if __name__ == "__main__":
    main()
