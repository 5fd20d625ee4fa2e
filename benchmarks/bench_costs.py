"""Before and after of each cost removed from the training and decoding steps, measured side by side.

Each entry runs the old way and the new way in the same process on the same inputs (median of the timed
repeats after a warm-up), on the GPT-2-small shape with random weights:

1. optimizer step: ``torch.optim.AdamW`` as torch builds it by default (on CPU a loop over the tensors, on
   CUDA the multi-tensor ``foreach`` kernels) against ``fused=True``, on the LM's 124 M parameters with
   random gradients;
2. GPT-2's MLP activation: ``gelu_new`` as transformers writes it (seven Python elementwise operations)
   against ``F.gelu(approximate="tanh")`` (what ``PrefixLM`` swaps in), one training forward + backward of
   the LM at batch 32 × 30 positions;
3. beam search's prefix: ``generate`` copying each image's prefix once per beam and running all copies
   through the LM, against ``ClipCaptioner``'s prefix KV cache computed once per image and repeated per
   beam; beam 5, 32 images, exactly 40 new tokens (the two ways alternate, after an 8-token warm-up);
4. the teacher-forced pass: every caption token fed and the T + 1 kept logits cut to T (a non-contiguous
   view the loss's reshape copies), against ``ClipCaptioner.forward``, which leaves out the last caption
   token (it predicts nothing) and keeps exactly T; forward, loss and backward, dropout off.

Run:
    .venv/bin/python -m benchmarks.bench_costs [--repeats 3] [--threads 1] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers.activations import GELUTanh, NewGELUActivation

from benchmarks.bench_captioner import (
    SHAPES,
    command_line,
    figure,
    load_average,
    machine_description,
    quiet_libraries,
    run_lines,
    save_random_gpt2,
    training_captions,
    write_markdown,
)
from clipcap.captioner import ClipCaptioner
from clipcap.generation import DecodingConfig
from clipcap.kv_cache import decoding_cache
from clipcap.lm import PrefixLM
from clipcap.mapper import MLPMapper
from clipcap.objectives.cross_entropy import token_cross_entropy

BATCH = 32
PREFIX = 10
CAPTION_TOKENS = 20  # positions after the prefix


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first touches of fresh memory are page faults on CPU
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def optimizer_step(lm: PrefixLM, repeats: int) -> tuple[float, float]:
    parameters = [p for p in lm.parameters() if p.requires_grad]
    for p in parameters:
        p.grad = torch.randn_like(p)
    result = []
    for fused in (False, True):
        optimizer = torch.optim.AdamW(parameters, lr=1e-5, fused=fused)
        result.append(median_seconds(optimizer.step, repeats))
    return result[0], result[1]


def set_activation(lm: PrefixLM, kind: type[torch.nn.Module]) -> None:
    for module in lm.model.modules():
        for name, child in module.named_children():
            if isinstance(child, (GELUTanh, NewGELUActivation)):
                setattr(module, name, kind())


def activation(lm: PrefixLM, repeats: int) -> tuple[float, float]:
    embeds = torch.randn(BATCH, PREFIX + CAPTION_TOKENS, lm.embed_dim)

    def step() -> None:
        lm(embeds, logits_to_keep=CAPTION_TOKENS).float().log_softmax(-1)[..., 0].mean().backward()
        lm.zero_grad(set_to_none=True)

    result = []
    for kind in (NewGELUActivation, GELUTanh):
        set_activation(lm, kind)
        result.append(median_seconds(step, repeats))
    return result[0], result[1]


def shared_prefix(lm: PrefixLM, repeats: int) -> tuple[float, float]:
    """Median seconds of a beam-5 call each way; the two ways alternate, so that neither always runs
    second (on this CPU a single call each was 14 % apart in favour of whichever ran first)."""
    captioner = ClipCaptioner(lm, functools.partial(MLPMapper, prefix_length=PREFIX), clip_dim=512).eval()
    features = torch.randn(BATCH, 512)
    decoding = DecodingConfig(num_beams=5, max_new_tokens=40, ignore_stops=True)
    captioner.generate_ids(features, DecodingConfig(num_beams=5, max_new_tokens=8, ignore_stops=True))
    shared = captioner._starting_cache

    def per_beam(prefix: torch.Tensor, attention_mask: torch.Tensor, decoding: DecodingConfig):
        # An empty cache of the same kind: generate's own expansion runs the prefix once per beam.
        return decoding_cache(lm.base_model.config, prefix.shape[1] + decoding.max_new_tokens)

    seconds: dict[bool, list[float]] = {False: [], True: []}
    for repeat in range(repeats):
        for once_per_image in (False, True) if repeat % 2 == 0 else (True, False):
            captioner._starting_cache = shared if once_per_image else per_beam
            start = time.perf_counter()
            captioner.generate_ids(features, decoding)
            seconds[once_per_image].append(time.perf_counter() - start)
    return statistics.median(seconds[False]), statistics.median(seconds[True])


def last_caption_token(lm: PrefixLM, repeats: int) -> tuple[float, float]:
    """Median seconds of a teacher-forced cross-entropy forward + backward (MLP mapper, batch 32 captions of
    20 tokens) feeding every caption token and cutting the T + 1 kept logits to T (before), against
    ``ClipCaptioner.forward``, which leaves out the last token and keeps T (after); alternating, after a
    warm-up each. Dropout off, so that both compute the same logits (checked)."""
    captioner = ClipCaptioner(
        lm,
        functools.partial(MLPMapper, prefix_length=PREFIX),
        clip_dim=512,
        max_caption_tokens=CAPTION_TOKENS,
    ).eval()
    features = torch.randn(BATCH, 512)
    tokens = captioner.encode_captions(training_captions(captioner.tokenizer, BATCH))

    def every_token() -> torch.Tensor:
        prefix = captioner.prefix(features)
        embeds = torch.cat([prefix, lm.embed(tokens.input_ids)], dim=1)
        mask = torch.cat([tokens.attention_mask.new_ones(prefix.shape[:2]), tokens.attention_mask], dim=1)
        return lm(embeds, mask, logits_to_keep=tokens.input_ids.shape[1] + 1)[:, :-1]

    ways = {False: every_token, True: lambda: captioner(features, tokens).logits}
    torch.testing.assert_close(ways[False](), ways[True](), atol=1e-4, rtol=1e-4)

    def step(without_last: bool) -> float:
        start = time.perf_counter()
        loss, _ = token_cross_entropy(ways[without_last](), tokens.labels)
        loss.backward()
        captioner.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    seconds: dict[bool, list[float]] = {False: [], True: []}
    for way in (False, True):
        step(way)
    for repeat in range(repeats):
        for way in (False, True) if repeat % 2 == 0 else (True, False):
            seconds[way].append(step(way))
    return statistics.median(seconds[False]), statistics.median(seconds[True])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", type=Path, default=None, help="write the block into this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_libraries()
    load_before = load_average()
    with tempfile.TemporaryDirectory() as folder:
        save_random_gpt2(SHAPES["gpt2-small"], Path(folder))
        lm = PrefixLM(folder, trainable=True)
    entries = [
        ("optimizer step, 124 M parameters", "AdamW default", "AdamW fused", optimizer_step),
        (
            "LM forward + backward, batch 32 × 30",
            "gelu_new (Python ops)",
            'F.gelu(approximate="tanh")',
            activation,
        ),
        (
            "beam-5 generation, 32 images × 40 tokens",
            "prefix run once per beam",
            "prefix run once per image",
            shared_prefix,
        ),
        (
            "teacher-forced forward + backward + loss, batch 32 × 20 tokens",
            "every caption token fed, T + 1 logits cut to T",
            "last token not fed, T logits",
            last_caption_token,
        ),
    ]
    rows = ["| cost | before | after | before | after | saved |", "|---|---|---|---:|---:|---:|"]
    for what, old, new, measure in entries:
        before, after = measure(lm, args.repeats)
        rows.append(
            f"| {what} | {old} | {new} | {figure(before)} s | {figure(after)} s | "
            f"{100 * (1 - after / before):.0f} % |"
        )
        print(rows[-1], flush=True)
    block = "\n".join(
        [
            "### Costs removed, before and after, cpu",
            "",
            *run_lines(
                command_line(__file__, argv),
                machine_description(torch.device("cpu"), "float32", args.threads),
                load_before,
            ),
            f"- GPT-2-small shape, random weights, LM trained; median of {args.repeats} after a warm-up (the "
            "beam-search and embedding entries: the two ways alternate after a warm-up)",
            "",
            *rows,
        ]
    )
    print(block)
    if args.write:
        write_markdown(args.write, "costs-cpu", block)


if __name__ == "__main__":
    main()
