"""Reward-finetuning benchmark (part of ``make bench``): one step of each preset of the policy-gradient
objective, and the CIDEr-D reward on its own.

1. One step of ``DiscriTune`` (greedy rollout, the retrieval reward) and of ``SCST`` (5 sampled captions
   per image and each image's greedy caption, the CIDEr-D reward) at batch 32 and 100, for the GPT-2 shapes
   of ``bench_captioner.py`` with random weights (no downloads); every caption exactly 20 tokens (stops
   unreachable), the LM and the mapper trained, a fused Adam step. Parts, read from clocks around the calls
   the objective makes: rollout (every ``generate_ids`` call), rewards (decoding, tokenizing, the reward
   objects), the log-prob pass (teacher-forced forward, log π, the loss), backward, optimizer. DiscriTune's
   receiver is a CLIP of the ViT-B/32 shape; SCST's references are 5 COCO-like captions per image drawn
   from a 400-word vocabulary, with the document frequencies of 5,000 such images.
2. The CIDEr-D reward of 100 images × 5 samples (``CiderReward``: PTB-like tokenization and
   ``clipcap.metrics.cider.CiderD``, references' vectors kept between calls, as in training), against
   pycocoevalcap's ``Cider`` (pure Python; document frequencies from the scored sets) on the same tokenized
   captions; compared with the SCST rollout time of the same run.

Run:
    .venv/bin/python -m benchmarks.bench_rewards [--shapes small,gpt2-small] [--batches 32,100] [--steps 2]
        [--threads 1] [--device cpu|cuda] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

from benchmarks.bench_captioner import (
    command_line,
    figure,
    load_average,
    machine_description,
    quiet_libraries,
    run_lines,
    write_markdown,
)
from benchmarks.bench_discritune import Clock, random_captioner, timed_steps
from clipcap.clip import ClipEncoder
from clipcap.data.batch import CaptionBatch
from clipcap.generation import DecodingConfig
from clipcap.metrics.ptb import ptb_tokenize_all
from clipcap.objectives import SCST, CiderReward, DiscriTune, PolicyGradient
from clipcap.objectives.base import TrainingData
from clipcap.objectives.reward_functions import RolloutCaptions

CAPTION_TOKENS = 20
SAMPLES = 5
PARTS = ("rollout", "rewards", "log-prob pass", "backward", "optimizer")
PRESETS = ("DiscriTune", "SCST")


def coco_like_captions(count: int, seed: int, vocabulary: int = 400) -> list[str]:
    """Captions of 8 to 14 words drawn from a Zipf-like vocabulary, ending with "." as COCO's often do."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocabulary)]
    weights = [1.0 / (rank + 1) for rank in range(vocabulary)]
    return [" ".join(rng.choices(words, weights, k=rng.randint(8, 14))) + "." for _ in range(count)]


def reference_sets(images: int, seed: int) -> list[list[str]]:
    captions = coco_like_captions(images * SAMPLES, seed)
    return [captions[i * SAMPLES : (i + 1) * SAMPLES] for i in range(images)]


def build_objective(preset: str, known_ids: int, device: torch.device) -> PolicyGradient:
    """The preset, its captions' ids folded into the random LM's small tokenizer."""
    rollout = DecodingConfig(max_new_tokens=CAPTION_TOKENS, ignore_stops=True)
    if preset == "DiscriTune":
        objective: PolicyGradient = DiscriTune(rollout=rollout)
        objective.set_receiver(
            ClipEncoder.from_model(CLIPModel(CLIPConfig()), name="random ViT-B/32 shape").to(device)
        )
    else:
        objective = SCST(
            rollout=DecodingConfig(do_sample=True, max_new_tokens=CAPTION_TOKENS, ignore_stops=True)
        )
        objective.setup(TrainingData(train_references=lambda: reference_sets(5000, seed=1)))
    decode = type(objective)._texts
    objective._texts = lambda captioner, ids: decode(captioner, [[i % known_ids for i in row] for row in ids])
    return objective


def bench_step(
    preset: str, shape_name: str, batch: int, steps: int, device: torch.device
) -> dict[str, float]:
    """Median seconds of each part of one step of ``preset``, and of the whole step (key ``"step"``)."""
    captioner = random_captioner(shape_name, device)
    objective = build_objective(preset, len(captioner.tokenizer), device)
    objective.train()
    clock = Clock(device)
    captioner.generate_ids = clock.around(captioner.generate_ids, after="rollout")
    objective._rewards = clock.around(objective._rewards, after="rewarded")
    references = reference_sets(batch, seed=2)

    def make_batch(step: int) -> CaptionBatch:
        return CaptionBatch(
            image_ids=[f"{step}-{i}" for i in range(batch)],
            clip_features=torch.randn(batch, 512, device=device),
            references=references,
        )

    def parts(m: dict[str, float]) -> dict[str, float]:
        return {
            "rollout": m["rollout"] - m["start"],
            "rewards": m["rewarded"] - m["rollout"],
            "log-prob pass": m["loss"] - m["rewarded"],
            "backward": m["backward"] - m["loss"],
            "optimizer": m["optimizer"] - m["backward"],
        }

    return timed_steps(objective, captioner, make_batch, steps, clock, parts)


def bench_cider(images: int = 100, repeats: int = 5) -> dict[str, float]:
    """Median seconds to reward ``images`` × 5 candidates with CIDEr-D: clipcap's reward (tokenization
    included, kept vectors, as in training), its tokenization alone, and pycocoevalcap's ``Cider`` on the
    already tokenized captions."""
    from pycocoevalcap.cider.cider import Cider

    reward = CiderReward()
    reward.setup(TrainingData(train_references=lambda: reference_sets(5000, seed=1)), {})
    references = reference_sets(images, seed=2)
    candidates = coco_like_captions(images * SAMPLES, seed=3)
    batch = CaptionBatch(
        image_ids=[str(i) for i in range(images)], clip_features=torch.zeros(images, 1), references=references
    )
    captions = RolloutCaptions(candidates, torch.arange(images).repeat_interleave(SAMPLES), batch)
    tokenized_candidates = ptb_tokenize_all(candidates)
    tokenized_references = [ptb_tokenize_all(refs) for refs in references]
    gts = {i: tokenized_references[i // SAMPLES] for i in range(len(candidates))}
    res = {i: [caption] for i, caption in enumerate(tokenized_candidates)}
    timings: dict[str, list[float]] = {"clipcap": [], "tokenization": [], "pycocoevalcap": []}
    reward(captions)  # the first call computes and keeps the references' vectors
    for _ in range(repeats):
        started = time.perf_counter()
        reward(captions)
        timings["clipcap"].append(time.perf_counter() - started)
        started = time.perf_counter()
        ptb_tokenize_all(candidates)
        for refs in references:
            ptb_tokenize_all(refs)
        timings["tokenization"].append(time.perf_counter() - started)
        started = time.perf_counter()
        Cider().compute_score(gts, res)
        timings["pycocoevalcap"].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in timings.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="small,gpt2-small")
    parser.add_argument("--batches", default="32,100")
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--write", type=Path, default=None, help="write the block into this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_libraries()
    device = torch.device(args.device)
    load_before = load_average()
    batches = [int(batch) for batch in args.batches.split(",")]
    cider = bench_cider()
    print(f"CIDEr-D reward, 100 images x 5: {cider}", flush=True)
    lines = [
        "| preset | shape | batch | captions | " + " | ".join(PARTS) + " | step |",
        "|---|---|---:|---:|" + "---:|" * (len(PARTS) + 1),
    ]
    scst_rollouts = {}
    for shape in args.shapes.split(","):
        for batch in batches:
            for preset in PRESETS:
                parts = bench_step(preset, shape, batch, args.steps, device)
                captions = batch * (SAMPLES + 1) if preset == "SCST" else batch
                if preset == "SCST":
                    scst_rollouts[(shape, batch)] = parts["rollout"]
                lines.append(
                    f"| {preset} | {shape} | {batch} | {captions} | "
                    + " | ".join(f"{figure(parts[p])} s" for p in PARTS)
                    + f" | {figure(parts['step'])} s |"
                )
                print(lines[-1], flush=True)
    comparisons = [
        f"{shape}: {100 * cider['clipcap'] / seconds:.2f} % of the SCST rollout at batch {batch} ({figure(seconds)} s)"
        for (shape, batch), seconds in scst_rollouts.items()
        if batch == 100
    ]
    block = "\n".join(
        [
            f"### Reward finetuning: one step of each preset, {args.device}",
            "",
            *run_lines(
                command_line(__file__, argv),
                machine_description(device, "float32", args.threads),
                load_before,
            ),
            f"- Captions of exactly {CAPTION_TOKENS} tokens; DiscriTune: greedy, the retrieval reward of a CLIP of the"
            " ViT-B/32 shape; SCST: 5 sampled captions per image plus the greedy one (the captions column counts"
            " both), CIDEr-D against 5 references per image; LM and mapper trained, fused Adam; median of the"
            f" timed steps ({args.steps}) after a warm-up",
            "",
            *lines,
            "",
            f"CIDEr-D reward of 100 images × 5 samples (`CiderReward`, tokenization included, references' vectors"
            f" kept): {1000 * cider['clipcap']:.1f} ms, of which PTB-like tokenization of the candidates and"
            f" references {1000 * cider['tokenization']:.1f} ms; pycocoevalcap's `Cider` on the same tokenized"
            f" captions: {1000 * cider['pycocoevalcap']:.1f} ms"
            + (f". Against the rollout: {'; '.join(comparisons)}." if comparisons else "."),
        ]
    )
    print(block)
    if args.write:
        write_markdown(args.write, f"rewards-{args.device}", block)


if __name__ == "__main__":
    main()
