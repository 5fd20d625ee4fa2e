"""DiscriTune step benchmark: one step at batch 100, timed by part.

For GPT-2-shaped LMs with random weights (the ``small`` and ``gpt2-small`` shapes of
``bench_captioner.py``) and a receiver CLIP of the ViT-B/32 shape (random weights, 512-d embeddings),
each step is the objective's own ``DiscriTune.forward``, then backward and the optimizer, with clocks
around the calls the objective makes:

1. rollout: batched greedy ``generate`` of exactly 20 tokens per caption (stops unreachable);
2. receiver: the receiver CLIP's text tower on the captions (``encode_text``: tokenizing, the tower);
3. texts + reward: the rest of the reward, decoding the ids to texts and the in-batch retrieval reward;
4. teacher-forced pass: the captioner's forward over prefix + caption with gradient (the logits);
5. log π + loss: log π of the captions from those logits, the advantage and the loss;
6. backward;
7. optimizer: a fused Adam step and zeroing the gradients.

Parts 1, 2, 4 and 6 are the step's core, the work DiscriTune is made of; the others are its overhead
(``overhead_share``).

The mapper and the LM are both trained, as in the paper. Median over the timed steps after a warm-up.

Run:
    .venv/bin/python -m benchmarks.bench_discritune [--shapes small,gpt2-small] [--batch 100] [--steps 2]
        [--threads 1] [--device cpu|cuda] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import functools
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

from benchmarks.bench_captioner import (
    SHAPES,
    figure,
    load_average,
    machine_description,
    quiet_libraries,
    run_lines,
    save_random_gpt2,
    synchronize,
    write_markdown,
)
from clipcap.captioner import ClipCaptioner
from clipcap.clip import ClipEncoder
from clipcap.data.batch import CaptionBatch
from clipcap.generation import DecodingConfig
from clipcap.lm import PrefixLM
from clipcap.mapper import MLPMapper
from clipcap.objectives import DiscriTune

CAPTION_TOKENS = 20
PARTS = (
    "rollout",
    "receiver",
    "texts + reward",
    "teacher-forced pass",
    "log π + loss",
    "backward",
    "optimizer",
)
CORE = ("rollout", "receiver", "teacher-forced pass", "backward")


class Clock:
    """Timestamps taken inside ``DiscriTune.forward`` by wrapping what it calls (device synced)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: dict[str, float] = {}
        self.totals: dict[str, float] = {}

    def mark(self, name: str) -> None:
        synchronize(self.device)
        self.marks[name] = time.perf_counter()

    def total(self, fn, name: str):
        """``fn`` with its (device-synced) durations summed into ``self.totals[name]``."""

        def wrapped(*args, **kwargs):
            synchronize(self.device)
            started = time.perf_counter()
            result = fn(*args, **kwargs)
            synchronize(self.device)
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - started
            return result

        return wrapped

    def around(self, fn, before: str | None = None, after: str | None = None):
        def wrapped(*args, **kwargs):
            if before:
                self.mark(before)
            result = fn(*args, **kwargs)
            if after:
                self.mark(after)
            return result

        return wrapped


def random_captioner(shape_name: str, device: torch.device) -> ClipCaptioner:
    """A captioner of a GPT-2 shape with random weights, LM and MLP mapper trained (prefix 10, 512-d
    features), in training mode."""
    with tempfile.TemporaryDirectory() as folder:
        save_random_gpt2(SHAPES[shape_name], Path(folder))
        torch.manual_seed(0)
        captioner = ClipCaptioner(
            PrefixLM(folder, trainable=True), functools.partial(MLPMapper, prefix_length=10), clip_dim=512
        ).to(device)
    return captioner.train()


def timed_steps(
    objective: torch.nn.Module,
    captioner: ClipCaptioner,
    make_batch: Callable[[int], CaptionBatch],
    steps: int,
    clock: Clock,
    parts: Callable[[dict[str, float]], dict[str, float]],
) -> dict[str, float]:
    """Median seconds of each part of ``steps`` training steps after one warm-up step, and of the whole
    step (key ``"step"``): the objective's forward on ``make_batch(step)``, backward, a fused Adam step.

    ``parts`` turns the clock's marks into named durations: ``start``, ``loss``, ``backward`` and
    ``optimizer`` are set here, the others by the clocks the caller put around the objective's calls.
    """
    optimizer = torch.optim.Adam(captioner.parameters(), lr=1e-7, fused=True)
    times: dict[str, list[float]] = {}
    for step in range(steps + 1):
        batch = make_batch(step)
        clock.totals.clear()
        clock.mark("start")
        loss = objective(captioner, batch).loss
        clock.mark("loss")
        loss.backward()
        clock.mark("backward")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.mark("optimizer")
        if step:  # the first step warms up
            marks = clock.marks
            durations = {**parts(marks), "step": marks["optimizer"] - marks["start"]}
            for part, seconds in durations.items():
                times.setdefault(part, []).append(seconds)
    return {part: statistics.median(values) for part, values in times.items()}


def bench_shape(
    shape_name: str, batch: int, steps: int, device: torch.device, from_rollout: bool = False
) -> dict[str, float]:
    """Median seconds of each part of a DiscriTune step, and of the whole step (key ``"step"``).

    The step is the objective's own ``DiscriTune.forward`` (rollout, receiver, rewards, log-prob pass, loss)
    then backward and an Adam step; the parts are read from clocks around the calls it makes: the rollout
    ends when ``generate_ids`` (or, ``from_rollout``, ``rollout_with_logits``) returns, CLIP scoring
    (decoding the ids, the receiver's text tower, the rewards) ends when the captions' tokens are built
    for log π, and the log-prob pass runs from there to the loss: a teacher-forced forward pass, or with
    ``from_rollout`` (``DiscriTune(log_probs_from_rollout=True)``) only picking log π from the rollout's
    logits.
    """
    captioner = random_captioner(shape_name, device)
    receiver = ClipEncoder.from_model(CLIPModel(CLIPConfig()), name="random ViT-B/32 shape").to(device)
    known_ids = len(captioner.tokenizer)  # the random LM's ids beyond its small tokenizer are mapped into it

    class Objective(DiscriTune):
        @staticmethod
        def _texts(captioner: ClipCaptioner, caption_ids: list[list[int]]) -> list[str]:
            return DiscriTune._texts(captioner, [[i % known_ids for i in ids] for ids in caption_ids])

    objective = Objective(
        rollout=DecodingConfig(max_new_tokens=CAPTION_TOKENS, ignore_stops=True),
        log_probs_from_rollout=from_rollout,
    )
    objective.set_receiver(receiver)
    clock = Clock(device)
    captioner.generate_ids = clock.around(captioner.generate_ids, after="rollout")
    captioner.rollout_with_logits = clock.around(captioner.rollout_with_logits, after="rollout")
    Objective._caption_tokens = staticmethod(clock.around(DiscriTune._caption_tokens, before="scored"))

    def make_batch(step: int) -> CaptionBatch:
        return CaptionBatch(
            image_ids=[str(i) for i in range(batch)], clip_features=torch.randn(batch, 512, device=device)
        )

    receiver.encode_text = clock.total(receiver.encode_text, "receiver")
    captioner.forward = clock.total(captioner.forward, "teacher-forced pass")

    def parts(m: dict[str, float]) -> dict[str, float]:
        receiver_seconds = clock.totals.get("receiver", 0.0)
        teacher_forced = clock.totals.get("teacher-forced pass", 0.0)
        return {
            "rollout": m["rollout"] - m["start"],
            "receiver": receiver_seconds,
            "texts + reward": m["scored"] - m["rollout"] - receiver_seconds,
            "teacher-forced pass": teacher_forced,
            "log π + loss": m["loss"] - m["scored"] - teacher_forced,
            "backward": m["backward"] - m["loss"],
            "optimizer": m["optimizer"] - m["backward"],
        }

    return timed_steps(objective, captioner, make_batch, steps, clock, parts)


def overhead_share(parts: dict[str, float]) -> float:
    """The share of a step (``parts["step"]``) spent outside its core parts (``CORE``)."""
    return 1 - sum(parts[part] for part in CORE) / parts["step"]


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
        "| shape | " + " | ".join(PARTS) + " | step | overhead share |",
        "|---|" + "---:|" * (len(PARTS) + 2),
    ]
    for shape in args.shapes.split(","):
        parts = bench_shape(shape, args.batch, args.steps, device)
        total = parts["step"]
        share = overhead_share(parts)
        lines.append(
            f"| {shape} | "
            + " | ".join(f"{figure(parts[p])} s" for p in PARTS)
            + f" | {figure(total)} s | {100 * share:.0f} % |"
        )
        print(lines[-1], flush=True)
    command = "python -m benchmarks.bench_discritune " + " ".join(
        shlex.quote(a) for a in (argv or sys.argv[1:])
    )
    block = "\n".join(
        [
            f"### DiscriTune step, {args.device}, batch {args.batch}",
            "",
            *run_lines(command.strip(), machine_description(device, "float32", args.threads), load_before),
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
