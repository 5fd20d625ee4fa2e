"""The decoding KV cache: transformers' ``DynamicCache`` (grown by concatenation), its ``StaticCache``
(preallocated, attends over every allocated position) and clipcap's ``PreallocatedLayer`` cache
(``clipcap.kv_cache``: preallocated, attends over the positions written, reorders only the positions
written after the shared prefix), measured side by side in one run.

For the GPT-2 shapes of ``bench_captioner.py`` (random weights), ``ClipCaptioner.generate_ids`` on 32 images,
exactly 40 new tokens (stops unreachable), prefix 10: greedy, beam 5 (``generate``'s ranking), beam 5 with
ClipCap's ranking (clipcap's own loop), and sampling 5 captions per image. The arms differ only in
``DecodingConfig.kv_cache``:

- ``dynamic``: a ``DynamicCache`` (with the prefix computed once per image and repeated per beam or sample,
  as clipcap did before);
- ``static``: ``cache_implementation="static"``, a ``StaticCache`` of prefix + 40 positions; it cannot
  repeat a prefix cache (its layers have no ``batch_repeat_interleave``), so ``generate`` runs the prefix
  once per beam or sample; ClipCap's beam ranking refuses it (its own loop); on a CPU transformers does
  not compile it;
- ``preallocated``: ``clipcap.kv_cache.decoding_cache``, the default.

Rounds alternate the arms (after one warm-up call each); the median of each is reported, with whether each
arm's captions equal the dynamic arm's (sampling: under the same seed).

Run:
    .venv/bin/python -m benchmarks.bench_kv_cache [--shapes small,gpt2-small] [--rounds 3] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_captioner import (
    BEAMS,
    CLIP_DIM,
    GENERATION_IMAGES,
    NEW_TOKENS,
    PREFIX_LENGTH,
    SHAPES,
    figure,
    load_average,
    publish_side_by_side,
    quiet_libraries,
    save_random_gpt2,
)
from clipcap.captioner import ClipCaptioner
from clipcap.generation import DecodingConfig
from clipcap.lm import PrefixLM
from clipcap.mapper import MLPMapper

ARMS = ("dynamic", "static", "preallocated")  # values of DecodingConfig.kv_cache
SAMPLES = 5


def decodings(tokens: int) -> dict[str, DecodingConfig]:
    fixed = {"max_new_tokens": tokens, "ignore_stops": True}
    return {
        "greedy": DecodingConfig(**fixed),
        f"beam {BEAMS}": DecodingConfig(num_beams=BEAMS, **fixed),
        f"beam {BEAMS}, ClipCap's ranking": DecodingConfig(num_beams=BEAMS, beam_ranking="clipcap", **fixed),
        f"sampling, {SAMPLES} per image": DecodingConfig(
            do_sample=True, num_return_sequences=SAMPLES, **fixed
        ),
    }


def bench_shape(
    shape_name: str, rounds: int, images: int = GENERATION_IMAGES, tokens: int = NEW_TOKENS
) -> dict[str, dict[str, tuple[float, bool] | None]]:
    """For each decoding, each arm's median seconds and whether its captions equal the dynamic arm's
    (None: the arm does not run that decoding)."""
    with tempfile.TemporaryDirectory() as folder:
        save_random_gpt2(SHAPES[shape_name], Path(folder))
        torch.manual_seed(0)
        captioner = ClipCaptioner(
            PrefixLM(folder), functools.partial(MLPMapper, prefix_length=PREFIX_LENGTH), clip_dim=CLIP_DIM
        ).eval()
    features = torch.randn(images, CLIP_DIM)
    results: dict[str, dict[str, tuple[float, bool] | None]] = {}
    for name, decoding in decodings(tokens).items():
        arms = [arm for arm in ARMS if not (arm == "static" and decoding.beam_ranking == "clipcap")]

        def run(arm: str, decoding: DecodingConfig = decoding) -> tuple[float, list[list[int]]]:
            torch.manual_seed(1)
            started = time.perf_counter()
            ids = captioner.generate_ids(features, dataclasses.replace(decoding, kv_cache=arm))
            return time.perf_counter() - started, ids

        captions = {arm: run(arm)[1] for arm in arms}  # warm-up
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        for _ in range(rounds):
            for arm in arms:
                times[arm].append(run(arm)[0])
        results[name] = {
            arm: (statistics.median(times[arm]), captions[arm] == captions["dynamic"])
            if arm in arms
            else None
            for arm in ARMS
        }
        print(f"{shape_name} {name}: {results[name]}", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="small,gpt2-small")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", type=Path, default=None)
    # Fewer images and tokens, for the test suite's smoke run.
    parser.add_argument("--images", type=int, default=GENERATION_IMAGES, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=NEW_TOKENS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    quiet_libraries()
    load_before = load_average()
    lines = [
        "| shape | decoding | dynamic (before) | static | preallocated (now) | now vs before | "
        "static vs before | captions equal to dynamic's (static, now) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for shape in args.shapes.split(","):
        for name, arms in bench_shape(shape, args.rounds, args.images, args.tokens).items():
            dynamic, static, now = arms["dynamic"], arms["static"], arms["preallocated"]
            static_cells = (
                (f"{figure(static[0])} s", f"{dynamic[0] / static[0]:.2f}×", "yes" if static[1] else "no")
                if static
                else ("–", "–", "–")
            )
            lines.append(
                f"| {shape} | {name} | {figure(dynamic[0])} s | {static_cells[0]} | {figure(now[0])} s | "
                f"{dynamic[0] / now[0]:.2f}× | {static_cells[1]} | {static_cells[2]}, "
                f"{'yes' if now[1] else 'no'} |"
            )
    publish_side_by_side(
        "### KV cache for decoding: dynamic, static and preallocated",
        __file__,
        argv,
        load_before,
        (
            f"`generate_ids` on {args.images} images, exactly {args.tokens} new tokens, prefix "
            f"{PREFIX_LENGTH}, random weights; the static arm runs the prefix once per beam or sample (its "
            f"cache cannot be repeated); median of {args.rounds} alternating rounds after a warm-up call"
        ),
        lines,
        args.write,
        "kv-cache-cpu",
    )


if __name__ == "__main__":
    main()
