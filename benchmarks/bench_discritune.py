"""DiscriTune step benchmark: one step at batch 100, timed by part.

For GPT-2-shaped LMs with random weights (the ``small`` and ``gpt2-small`` shapes of
``bench_captioner.py``) and a receiver CLIP of the ViT-B/32 shape (random weights, 512-d embeddings),
each step does what ``DiscriTune.forward`` and the optimizer do, with a clock around each part:

1. rollout: batched greedy ``generate`` of exactly 20 tokens per caption (stops unreachable);
2. CLIP scoring: the receiver's text tower on the 100 captions and the in-batch retrieval reward;
3. log-prob pass: one teacher-forced forward of prefix + caption with gradient, log π, the loss;
4. backward;
5. optimizer: Adam step and zeroing the gradients.

The mapper and the LM are both trained, as in the paper. Median over the timed steps after a warm-up.

Run:
    .venv/bin/python benchmarks/bench_discritune.py [--shapes small,gpt2-small] [--batch 100] [--steps 2]
        [--threads 1] [--device cpu|cuda] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

from bench_captioner import (
    SHAPES,
    figure,
    load_average,
    machine_description,
    quiet_libraries,
    save_random_gpt2,
    synchronize,
    write_markdown,
)
from clipcap.captioner import ClipCaptioner
from clipcap.clip import ClipEncoder
from clipcap.generation import DecodingConfig
from clipcap.lm import PrefixLM
from clipcap.mapper import MLPMapper
from clipcap.objectives import DiscriTune
from clipcap.objectives.rewards import caption_log_probs, discriminative_reward, reinforce_loss

CAPTION_TOKENS = 20
PARTS = ("rollout", "CLIP scoring", "log-prob pass", "backward", "optimizer")


def bench_shape(shape_name: str, batch: int, steps: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each part of a DiscriTune step."""
    with tempfile.TemporaryDirectory() as folder:
        save_random_gpt2(SHAPES[shape_name], Path(folder))
        torch.manual_seed(0)
        captioner = ClipCaptioner(
            PrefixLM(folder, trainable=True), functools.partial(MLPMapper, prefix_length=10), clip_dim=512
        ).to(device)
    receiver = ClipEncoder.from_model(CLIPModel(CLIPConfig()), name="random ViT-B/32 shape").to(device)
    optimizer = torch.optim.Adam(captioner.parameters(), lr=1e-7)
    rollout = DecodingConfig(min_new_tokens=CAPTION_TOKENS, max_new_tokens=CAPTION_TOKENS)
    known_ids = len(captioner.tokenizer)  # the random LM's ids beyond its small tokenizer are mapped into it
    times: dict[str, list[float]] = {part: [] for part in PARTS}

    clock: dict[str, float] = {}

    def lap(part: str, started: float) -> float:
        synchronize(device)
        now = time.perf_counter()
        clock[part] = now - started
        return now

    for step in range(steps + 1):
        features = torch.randn(batch, 512, device=device)

        started = time.perf_counter()
        caption_ids = captioner.generate_ids(features, rollout)
        started = lap("rollout", started)
        texts = captioner.tokenizer.batch_decode([[i % known_ids for i in ids] for ids in caption_ids])
        with torch.no_grad():
            text_embeds = receiver.encode_text(texts)
            rewards = discriminative_reward(
                text_embeds, features, torch.arange(batch, device=device), receiver.logit_scale
            )
        started = lap("CLIP scoring", started)
        tokens, lengths = DiscriTune._caption_tokens(captioner, caption_ids)
        log_probs = caption_log_probs(captioner(features, tokens).logits, tokens.input_ids, lengths)
        loss = reinforce_loss(rewards, -rewards.mean(), log_probs).mean()
        started = lap("log-prob pass", started)
        loss.backward()
        started = lap("backward", started)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lap("optimizer", started)
        if step:  # the first step warms up
            for part, seconds in clock.items():
                times[part].append(seconds)
    return {part: statistics.median(values) for part, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="small,gpt2-small")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--write", type=Path, default=None, help="write the block into this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_libraries()
    device = torch.device(args.device)
    load_before = load_average()
    lines = [
        "| shape | " + " | ".join(PARTS) + " | step | rollout + backward share |",
        "|---|" + "---:|" * (len(PARTS) + 2),
    ]
    for shape in args.shapes.split(","):
        parts = bench_shape(shape, args.batch, args.steps, device)
        total = sum(parts.values())
        share = (parts["rollout"] + parts["backward"]) / total
        lines.append(
            f"| {shape} | "
            + " | ".join(f"{figure(parts[p])} s" for p in PARTS)
            + f" | {figure(total)} s | {100 * share:.0f} % |"
        )
        print(lines[-1], flush=True)
    command = "python benchmarks/bench_discritune.py " + " ".join(
        shlex.quote(a) for a in (argv or sys.argv[1:])
    )
    block = "\n".join(
        [
            f"### DiscriTune step, {args.device}, batch {args.batch}",
            "",
            f"- Command: `{command.strip()}`",
            f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- Machine: {machine_description(device, 'float32', args.threads)}",
            f"- Load: 1-minute load average {load_before} at start, {load_average()} at end",
            f"- Greedy rollout of exactly {CAPTION_TOKENS} tokens; receiver: CLIP of the ViT-B/32 shape (text "
            "tower 12 × 512), random weights; mapper and LM trained; median of the timed steps",
            "",
            *lines,
        ]
    )
    print(block)
    if args.write:
        write_markdown(args.write, f"discritune-{args.device}-{args.batch}", block)


if __name__ == "__main__":
    main()
