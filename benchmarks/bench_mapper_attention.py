"""The Transformer mapper's self-attention: ``nn.TransformerEncoderLayer``'s own forward against the packed
Q/K/V product and ``F.scaled_dot_product_attention`` of ``FusedAttentionEncoderLayer``, measured side by side
in one run.

ClipCap's Transformer mapper (8 layers, 8 heads, MLP ratio 2, ``clip_length`` 10 + prefix 10 positions) at
the widths of the two GPT-2 shapes of ``bench_captioner.py`` (256 and 768), random weights, batch 32 pooled
CLIP features of 512: one training forward + backward (how the mapper runs in every training step), and one
eval forward without gradients (how it runs when captioning, where both ways use torch's own fused encoder
kernel). The "before" mapper is the same module with its layers' class set back to
``nn.TransformerEncoderLayer``: same weights, same state-dict keys. Rounds alternate the two ways; the
median of each is reported, with the largest output difference.

Run:
    .venv/bin/python -m benchmarks.bench_mapper_attention [--shapes small,gpt2-small] [--rounds 9] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.bench_captioner import (
    CLIP_DIM,
    PREFIX_LENGTH,
    SHAPES,
    TRAIN_BATCH,
    TRANSFORMER_MAPPER_LAYERS,
    figure,
    load_average,
    publish_side_by_side,
)
from clipcap.mapper import TransformerMapper


def bench_width(width: int, rounds: int) -> dict[str, float]:
    """Median seconds of each way in training (forward + backward) and in eval (forward, no gradients), and
    the largest output difference."""
    torch.manual_seed(0)
    fused = TransformerMapper(
        CLIP_DIM, width, prefix_length=PREFIX_LENGTH, clip_length=10, num_layers=TRANSFORMER_MAPPER_LAYERS
    )
    plain = copy.deepcopy(fused)
    for layer in plain.transformer.layers:
        layer.__class__ = nn.TransformerEncoderLayer
    ways = {"before": plain, "after": fused}
    features = torch.randn(TRAIN_BATCH, CLIP_DIM)

    def train(mapper: TransformerMapper) -> float:
        mapper.train()
        started = time.perf_counter()
        mapper(features).square().mean().backward()
        seconds = time.perf_counter() - started
        mapper.zero_grad(set_to_none=True)
        return seconds

    def infer(mapper: TransformerMapper) -> float:
        mapper.eval()
        started = time.perf_counter()
        with torch.no_grad():
            mapper(features)
        return time.perf_counter() - started

    with torch.no_grad():
        difference = float((plain.train()(features) - fused.train()(features)).abs().max())
    result = {"difference": difference}
    for mode, run in (("train", train), ("eval", infer)):
        times: dict[str, list[float]] = {way: [] for way in ways}
        for mapper in ways.values():
            run(mapper)  # warm-up
        for _ in range(rounds):
            for way, mapper in ways.items():
                times[way].append(run(mapper))
        result.update({f"{mode} {way}": statistics.median(values) for way, values in times.items()})
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="small,gpt2-small")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_before = load_average()
    lines = [
        "| shape (width) | train: nn layer (before) | train: fused (now) | speed-up | eval: nn layer | "
        "eval: now | max output difference |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for shape in args.shapes.split(","):
        width = SHAPES[shape].n_embd
        r = bench_width(width, args.rounds)
        lines.append(
            f"| {shape} ({width}) | {figure(r['train before'])} s | {figure(r['train after'])} s | "
            f"{r['train before'] / r['train after']:.2f}× | {figure(r['eval before'])} s | "
            f"{figure(r['eval after'])} s | {r['difference']:.1e} |"
        )
        print(lines[-1], flush=True)
    publish_side_by_side(
        "### Transformer mapper attention: nn.TransformerEncoderLayer against the fused path",
        __file__,
        argv,
        load_before,
        (
            f"{TRANSFORMER_MAPPER_LAYERS} layers, 8 heads, MLP ratio 2, 10 + {PREFIX_LENGTH} positions, batch "
            f"{TRAIN_BATCH}, pooled features of {CLIP_DIM}; train = forward + backward in training mode, eval = "
            f"forward without gradients; median of {args.rounds} alternating rounds after a warm-up"
        ),
        lines,
        args.write,
        "mapper-attention-cpu",
    )


if __name__ == "__main__":
    main()
