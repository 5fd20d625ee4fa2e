"""The benchmark suite (``make bench``): every speed figure of one table, measured in one run.

For the two GPT-2 shapes of ``bench_captioner.py`` with random weights (``small``: 4 layers, width 256,
8,192 ids; ``gpt2-small``: 12 layers, width 768, 50,257 ids), no downloads, each row of the table is:

1. cross-entropy training, samples/s: MLP mapper + finetuned LM, and 8-layer Transformer mapper + frozen LM
   (``bench_captioner.bench_training``: batch 32, captions of 20 tokens);
2. caption generation, captions/s: 32 images, exactly 40 new tokens each (stops unreachable), greedy and
   beam 5, batched and KV-cached; the naive reference decoders (one image at a time, whole sequence re-run
   at each step) in the same run, and the speed-up over them (``bench_captioner.bench_generation``);
3. one DiscriTune step at batch 32 and 100, s/step, split by part (``bench_discritune.bench_shape``), with
   log π from a teacher-forced pass (the default) and from the rollout (``log_probs_from_rollout``);
4. one GumbelClip step at batch 32 and 100, s/step, split by part (:func:`bench_gumbel_clip`: the real
   ``clipcap.objectives.GumbelClip`` with a 20-step rollout, a random CLIP of the ViT-B/32 shape and the
   vocabulary bridge, then backward and an Adam step);
5. feature extraction, images/s, ``extract_entries`` as ``clipcap features`` runs it: the synthetic world's
   tiny CLIP on its 64 px PNGs in the ``small`` column, a random CLIP of the ViT-B/32 shape on 224 px PNGs
   in the ``gpt2-small`` column (``bench_data``).

The block it writes (``--write``) replaces the one between ``<!-- bench:suite-DEVICE -->`` markers.

Run:
    .venv/bin/python -m benchmarks.bench_suite [--shapes small,gpt2-small] [--threads 1] [--device cpu|cuda]
        [--quick] [--only training,generation,discritune,gumbel,extraction] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

import clipcap.gumbel
import clipcap.objectives.gumbel_clip
from benchmarks.bench_captioner import (
    BEAMS,
    CAPTION_TOKENS,
    CLIP_DIM,
    FULL,
    GENERATION_IMAGES,
    NEW_TOKENS,
    PREFIX_LENGTH,
    QUICK,
    SHAPES,
    TRAIN_BATCH,
    GenerationResult,
    Plan,
    bench_generation,
    bench_training,
    command_line,
    figure,
    load_average,
    machine_description,
    quiet_libraries,
    release,
    save_random_gpt2,
    synchronize,
    training_settings,
    write_markdown,
)
from benchmarks.bench_data import bench_extraction, time_extraction
from benchmarks.bench_discritune import CORE as DISCRITUNE_CORE
from benchmarks.bench_discritune import PARTS as DISCRITUNE_PARTS
from benchmarks.bench_discritune import bench_shape as bench_discritune
from benchmarks.bench_discritune import overhead_share
from benchmarks.model_flops import FORMULA as FLOP_FORMULA
from benchmarks.model_flops import setting_flops
from clipcap.captioner import ClipCaptioner
from clipcap.clip import ClipEncoder, load_clip_tokenizer, load_vocabulary_bridge
from clipcap.data.batch import CaptionBatch
from clipcap.data.records import ImageEntry
from clipcap.gumbel import GumbelRollout
from clipcap.lm import PrefixLM
from clipcap.mapper import MLPMapper
from clipcap.objectives import GumbelClip
from clipcap.synthetic.scenes import generate_scene, render_scene
from clipcap.synthetic.world import ensure_world

GROUPS = ("training", "generation", "discritune", "gumbel", "extraction")
STEP_BATCHES = (32, 100)  # DiscriTune and GumbelClip
ROLLOUT_TOKENS = 20  # GumbelClip's default rollout length, run in full (stops unreachable)
WARMUP_TOKENS = 4  # GumbelClip's warm-up step rolls out this many steps: it only has to initialise
UNREACHABLE_STOP = -1  # an id no LM emits: the rollout's only stop, so that every caption runs all steps
# The CPU targets (issue 19), each a ratio measured within one run:
CE_TARGET = 0.90  # cross-entropy training's model FLOP/s, as a share of the matrix products' own FLOP/s
BEAM_TARGET = 24.0  # batched beam 5 must reach this many times the naive beam-5 decoder's captions/s
OVERHEAD_TARGET = 0.10  # DiscriTune at batch 32: the step's share outside its core parts must be below
PROFILE_ROWS = 8  # operators listed in the profile of a target not met
EXTRACTION_BATCH = 64
EXTRACTION_WORKERS = 0
ENDOFTEXT = "<|endoftext|>"
GUMBEL_PARTS = ("rollout", "CLIP text + loss", "backward", "optimizer")
"""GumbelClip step parts: the objective's ``gumbel_rollout``; the rest of its forward (the captions read by
CLIP's text tower through the vocabulary bridge, the cosine loss); backward; Adam step and zeroing."""


@dataclass(frozen=True)
class SuitePlan:
    """How many iterations each row of one shape runs.

    Attributes:
        captioner: training and generation iterations (``bench_captioner.Plan``).
        step_repeats: timed DiscriTune and GumbelClip steps at each batch of ``STEP_BATCHES`` in order (the
            last count holds for further batches), each after one warm-up step.
        extraction_images: images of the one timed extraction.
    """

    captioner: Plan
    step_repeats: tuple[int, ...]
    extraction_images: int

    def steps_at(self, index: int) -> int:
        """Timed steps at the ``index``-th step batch."""
        return self.step_repeats[min(index, len(self.step_repeats) - 1)]


# gpt2-small's steps at batch 100 take 50 s (DiscriTune) and 90 s (GumbelClip) on one CPU thread: the
# whole suite takes about a quarter of an hour on a 2-core CPU, gpt2-small three quarters of it.
PLANS = {
    "small": SuitePlan(FULL, step_repeats=(3, 3), extraction_images=1000),
    "gpt2-small": SuitePlan(FULL, step_repeats=(2, 1), extraction_images=256),
}
QUICK_PLAN = SuitePlan(QUICK, step_repeats=(1,), extraction_images=32)


@dataclass
class ShapeResults:
    """What the suite measured for one shape (empty where a group did not run).

    Attributes:
        parameters: the LM's parameter count.
        training: samples/s by training setting.
        generation: batched and naive captions/s.
        discritune: median seconds by part, by batch.
        discritune_fused: the same with ``DiscriTune(log_probs_from_rollout=True)``.
        gumbel: median seconds by part, by batch.
        extraction: ``(images/s, images extracted)``.
        matmul_rate: FLOP/s of the LM's matrix products alone (:func:`matmul_rate`).
        training_flops: model FLOPs of one training sample by setting (``benchmarks.model_flops``).
        profiles: operator profiles (markdown table lines) by workload, for the targets not met.
    """

    parameters: int | None = None
    training: dict[str, float] = field(default_factory=dict)
    generation: GenerationResult | None = None
    discritune: dict[int, dict[str, float]] = field(default_factory=dict)
    discritune_fused: dict[int, dict[str, float]] = field(default_factory=dict)
    gumbel: dict[int, dict[str, float]] = field(default_factory=dict)
    extraction: tuple[float, int] | None = None
    matmul_rate: float | None = None
    training_flops: dict[str, float] = field(default_factory=dict)
    profiles: dict[str, list[str]] = field(default_factory=dict)

    def training_share(self, setting: str) -> float:
        """Cross-entropy training's model FLOP/s in ``setting`` as a share of the matrix-product rate."""
        return self.training[setting] * self.training_flops[setting] / self.matmul_rate


@dataclass
class SuiteRow:
    """One row of the suite table: a figure per shape (None where not measured)."""

    measurement: str
    setting: str
    unit: str
    values: dict[str, float | None]


# ------------------------------------------------------------------------------------------ targets

MATRIX_PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv")


def lm_products(shape_name: str, batch: int) -> list[tuple[int, int, int]]:
    """The (m, k, n) matrix products of one cross-entropy step of the shape's LM, each as often as the
    step runs it: per layer Q/K/V, output, MLP up and down over batch × (prefix + caption) rows, the head
    over batch × (caption + 1) rows; each in its forward (m×k · k×n), input-gradient (m×n · n×k) and
    weight-gradient (k×m · m×n) orientation."""
    spec = SHAPES[shape_name]
    width, rows, head_rows = (
        spec.n_embd,
        batch * (PREFIX_LENGTH + CAPTION_TOKENS),
        batch * (CAPTION_TOKENS + 1),
    )
    layer = [
        (rows, width, 3 * width),
        (rows, width, width),
        (rows, width, 4 * width),
        (rows, 4 * width, width),
    ]
    forward = layer * spec.n_layer + [(head_rows, width, spec.vocab_size)]
    return [oriented for m, k, n in forward for oriented in ((m, k, n), (m, n, k), (k, m, n))]


def matmul_rate(shape_name: str, device: torch.device, rounds: int = 3) -> float:
    """FLOP/s of ``torch.mm`` alone on the products of :func:`lm_products` at ``TRAIN_BATCH`` (float32,
    random operands, the torch threads the run uses): the median over ``rounds`` rounds of all of them,
    after one warm-up round. It is the rate a training step could reach if it were nothing but its matrix
    products."""
    products = lm_products(shape_name, TRAIN_BATCH)
    operands = {}
    for m, k, n in set(products):
        operands[m, k, n] = (torch.randn(m, k, device=device), torch.randn(k, n, device=device))
    flops = sum(2 * m * k * n for m, k, n in products)
    seconds = []
    for round_ in range(rounds + 1):
        synchronize(device)
        started = time.perf_counter()
        for product in products:
            torch.mm(*operands[product])
        synchronize(device)
        if round_:
            seconds.append(time.perf_counter() - started)
    return flops / statistics.median(seconds)


def op_profile(run: Callable[[], object], rows: int = PROFILE_ROWS) -> list[str]:
    """A markdown table of where one call of ``run`` spends its CPU time, by operator self time: the matrix
    products together, the attention kernels together, then the ``rows`` costliest other operators. (CPU
    runs only: on a GPU the time is in kernels these operator names do not show.)"""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        run()
    key = "self_cpu_time_total"
    events = [event for event in profiler.key_averages() if getattr(event, key) > 0]
    total = sum(getattr(event, key) for event in events)
    products = [event for event in events if event.key in MATRIX_PRODUCTS]
    attention = [event for event in events if "scaled_dot_product" in event.key]
    others = sorted(
        (event for event in events if event not in products and event not in attention),
        key=lambda event: getattr(event, key),
        reverse=True,
    )

    def line(name: str, chosen: list) -> str:
        time_us = sum(getattr(event, key) for event in chosen)
        calls = sum(event.count for event in chosen)
        return f"| {name} | {figure(time_us / 1e6)} s | {100 * time_us / total:.1f} % | {calls} |"

    lines = ["| operator (self time) | time | share | calls |", "|---|---:|---:|---:|"]
    lines.append(line("matrix products (" + ", ".join(name[6:] for name in MATRIX_PRODUCTS) + ")", products))
    lines.append(line("attention kernels (scaled_dot_product_*)", attention))
    lines += [line(f"`{event.key}`", [event]) for event in others[:rows]]
    lines.append(line(f"{max(len(others) - rows, 0)} other operators", others[rows:]))
    return lines


# ------------------------------------------------------------------------------------------ GumbelClip


def full_vocabulary_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with exactly ``vocab_size`` ids, every one of them text, EOS at id 0.

    ``save_random_gpt2``'s tokenizer knows a few hundred ids, so a Gumbel rollout of the random LM would be
    nearly all ids without text: empty captions for CLIP, and a vocabulary bridge (and its (B, L, V) @
    (V, E) product) of a few hundred rows. Here every id has text, as GPT-2's: the byte alphabet, then
    openai CLIP's BPE pieces in merge order (word-final pieces as ``Ġword``), then more ``Ġpiece`` words,
    so a caption of L random ids reads as about L words. It decodes ids; it has no merges (GumbelClip never
    encodes text).
    """
    clip_vocabulary = load_clip_tokenizer().hf_tokenizer.get_vocab()
    pieces = [piece for piece, _ in sorted(clip_vocabulary.items(), key=lambda item: item[1])]
    pieces = [piece for piece in pieces if not piece.startswith("<|")]
    words = [f"Ġ{piece[:-4]}" if piece.endswith("</w>") else piece for piece in pieces]
    words += [f"Ġ{piece}" for piece in pieces if not piece.endswith("</w>")]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = list(dict.fromkeys([ENDOFTEXT, *alphabet, *words]))[:vocab_size]
    if len(tokens) < vocab_size:
        raise ValueError(
            f"full_vocabulary_tokenizer: only {len(tokens)} distinct tokens for {vocab_size} ids"
        )
    raw = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, unk_token=ENDOFTEXT
    )


def gumbel_clip_setup(shape_name: str, device: torch.device) -> tuple[ClipCaptioner, GumbelClip]:
    """A captioner of ``shape_name`` (MLP mapper, LM trained) and the GumbelClip objective that trains it.

    The objective reads captions with a random CLIP of the ViT-B/32 shape (``CLIPConfig()``'s defaults:
    512-d embeddings, a 12 × 512 text tower) and rolls out ``ROLLOUT_TOKENS`` steps with the default
    settings (temperature 1, straight-through hard samples, no ``checkpoint_steps``).
    """
    shape = SHAPES[shape_name]
    with tempfile.TemporaryDirectory(prefix="clipcap-bench-") as folder:
        save_random_gpt2(shape, Path(folder))
        full_vocabulary_tokenizer(shape.vocab_size).save_pretrained(folder)
        torch.manual_seed(0)
        captioner = ClipCaptioner(
            PrefixLM(folder, trainable=True),
            functools.partial(MLPMapper, prefix_length=PREFIX_LENGTH),
            clip_dim=CLIP_DIM,
        ).to(device)
    if (
        len(captioner.tokenizer) != shape.vocab_size
        or captioner.lm.eos_token_id != captioner.lm.model.config.eos_token_id
    ):
        raise RuntimeError(f"{shape_name}: the tokenizer does not cover the LM's {shape.vocab_size} ids")
    clip = ClipEncoder.from_model(CLIPModel(CLIPConfig()), name="random ViT-B/32 shape").to(device)
    # Built here, in memory only: the objective finds it there, and no cache file is written for a
    # throw-away vocabulary.
    load_vocabulary_bridge(captioner.tokenizer, clip.tokenizer, use_disk_cache=False)
    objective = GumbelClip(rollout=GumbelRollout(max_new_tokens=ROLLOUT_TOKENS))
    objective.set_clip(clip)
    return captioner, objective


def bench_gumbel_clip(
    captioner: ClipCaptioner, objective: GumbelClip, batch: int, steps: int, device: torch.device
) -> dict[str, float]:
    """Median seconds of each part of a GumbelClip training step (``GUMBEL_PARTS``) and of the whole step.

    A step is the objective's forward on ``batch`` random CLIP features, backward of its loss, an Adam step
    and zeroing the gradients, in training mode. The objective runs as it is; its ``gumbel_rollout`` is
    wrapped with a clock, and the rollout's stop ids are replaced by one no LM emits, so every caption has
    exactly ``ROLLOUT_TOKENS`` tokens (checked). One warm-up step with a ``WARMUP_TOKENS``-step rollout
    (it builds the text path and Adam's state), then ``steps`` timed steps.
    """
    captioner.train()
    objective.train()
    optimizer = torch.optim.Adam([p for p in captioner.parameters() if p.requires_grad], lr=1e-7, fused=True)
    rollout = objective.rollout
    real_rollout = clipcap.objectives.gumbel_clip.gumbel_rollout
    clock: dict[str, float] = {}

    def timed_rollout(*args, **kwargs) -> clipcap.gumbel.SoftCaption:
        synchronize(device)
        started = time.perf_counter()
        caption = real_rollout(*args, **kwargs)
        synchronize(device)
        clock["rollout"] = time.perf_counter() - started
        return caption

    def step(tokens: int) -> dict[str, float]:
        objective.rollout = dataclasses.replace(rollout, max_new_tokens=tokens)
        images = CaptionBatch(
            image_ids=[str(i) for i in range(batch)],
            clip_features=torch.randn(batch, CLIP_DIM, device=device),
        )
        synchronize(device)
        started = time.perf_counter()
        output = objective(captioner, images)
        synchronize(device)
        forward = time.perf_counter() - started
        if output.skip or float(output.terms["caption_tokens"]) != tokens:
            raise RuntimeError(
                f"GumbelClip step: skipped, or captions not all {tokens} tokens: {output.terms}"
            )
        started = time.perf_counter()
        output.loss.backward()
        synchronize(device)
        backward = time.perf_counter() - started
        started = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        seconds = {
            "rollout": clock["rollout"],
            "CLIP text + loss": forward - clock["rollout"],
            "backward": backward,
            "optimizer": time.perf_counter() - started,
        }
        return {**seconds, "step": sum(seconds.values())}

    never_stop = lambda *stop_arguments: [UNREACHABLE_STOP]  # noqa: E731
    try:
        with (
            mock.patch.object(clipcap.objectives.gumbel_clip, "gumbel_rollout", timed_rollout),
            mock.patch.object(clipcap.gumbel, "stop_token_ids", never_stop),
        ):
            step(WARMUP_TOKENS)
            timed = [step(ROLLOUT_TOKENS) for _ in range(steps)]
    finally:
        objective.rollout = rollout
    return {part: statistics.median(seconds[part] for seconds in timed) for part in timed[0]}


# ------------------------------------------------------------------------------------------ extraction


def bench_vit_b32_extraction(images: int, device: str) -> tuple[float, int]:
    """Images/s of a fresh extraction of ``images`` 224 px synthetic-scene PNGs with a random CLIP of the
    ViT-B/32 shape (224 px, patch 32, 12 × 768 vision tower), CLIP's default preprocessing."""
    encoder = ClipEncoder.from_model(CLIPModel(CLIPConfig()), name="random ViT-B/32 shape").to(device)
    size = encoder.model.config.vision_config.image_size
    with tempfile.TemporaryDirectory(prefix="clipcap-bench-") as folder:
        entries = []
        for index in range(images):
            path = Path(folder) / f"{index:05d}.png"
            render_scene(generate_scene("bench-suite", index), image_size=size).save(path)
            entries.append(ImageEntry(image_id=str(index), image=str(path), references=(), split="train"))
        return time_extraction(encoder, entries, EXTRACTION_WORKERS, EXTRACTION_BATCH)


# ------------------------------------------------------------------------------------------ the table


def step_seconds(parts: dict[str, float], names: tuple[str, ...]) -> float:
    """The whole step: its ``step`` entry when there is one, else the sum of the parts ``names``."""
    return parts["step"] if "step" in parts else sum(parts[name] for name in names)


def suite_rows(results: dict[str, ShapeResults], batches: tuple[int, ...]) -> list[SuiteRow]:
    """The table's rows, in order; a shape whose group did not run gets None, a row no shape has is left out."""
    rows: list[SuiteRow] = []

    def add(measurement: str, setting: str, unit: str, value: Callable[[ShapeResults], float | None]) -> None:
        values = {shape: value(result) for shape, result in results.items()}
        if any(v is not None for v in values.values()):
            rows.append(SuiteRow(measurement, setting, unit, values))

    def generation(value: Callable[[GenerationResult], float]) -> Callable[[ShapeResults], float | None]:
        return lambda r: None if r.generation is None else value(r.generation)

    def step(
        group: str, batch: int, value: Callable[[dict[str, float]], float]
    ) -> Callable[[ShapeResults], float | None]:
        return lambda r: None if batch not in getattr(r, group) else value(getattr(r, group)[batch])

    add(
        "matrix products alone",
        f"torch.mm on the LM's product shapes of a batch-{TRAIN_BATCH} training step (`matmul_rate`)",
        "GFLOP/s",
        lambda r: None if r.matmul_rate is None else r.matmul_rate / 1e9,
    )
    for setting, _, _ in training_settings():
        add(
            "cross-entropy training",
            f"{setting}, batch {TRAIN_BATCH}",
            "samples/s",
            lambda r, setting=setting: r.training.get(setting),
        )
        add(
            "cross-entropy training: model FLOP/s / matrix-product FLOP/s",
            setting,
            "%",
            lambda r, setting=setting: (
                100 * r.training_share(setting) if setting in r.training and r.matmul_rate else None
            ),
        )
    batched = f"generation, {NEW_TOKENS} tokens, batch {GENERATION_IMAGES}"
    add(batched, "greedy (generate_ids, KV cache)", "captions/s", generation(lambda g: g.batched_greedy))
    add(batched, f"beam {BEAMS} (generate_ids, KV cache)", "captions/s", generation(lambda g: g.batched_beam))
    naive = f"naive generation, {NEW_TOKENS} tokens"
    add(naive, "greedy, one image at a time, no cache", "captions/s", generation(lambda g: g.naive_greedy))
    add(
        "greedy speed-up over naive",
        "batched greedy / naive greedy",
        "×",
        generation(lambda g: g.batched_greedy / g.naive_greedy),
    )
    add(
        naive,
        f"beam {BEAMS}, one image at a time, no cache",
        "captions/s",
        generation(lambda g: g.naive_beam),
    )
    add(
        f"beam-{BEAMS} speed-up over naive",
        f"batched beam {BEAMS} / naive beam {BEAMS}",
        "×",
        generation(lambda g: g.batched_beam / g.naive_beam),
    )
    for group, how in (
        ("discritune", "log π by a teacher-forced pass (default)"),
        ("discritune_fused", "log π from the rollout (log_probs_from_rollout)"),
    ):
        for index, batch in enumerate(batches):
            add(
                "DiscriTune step",
                f"batch {batch}, greedy rollout of {ROLLOUT_TOKENS} tokens, {how}",
                "s/step",
                step(group, batch, lambda parts: step_seconds(parts, DISCRITUNE_PARTS)),
            )
            if index == 0:
                add(
                    f"DiscriTune batch {batch}: overhead share",
                    f"1 − ({' + '.join(DISCRITUNE_CORE)}) / step, {how}",
                    "%",
                    step(group, batch, lambda parts: 100 * overhead_share(parts)),
                )
    for batch in batches:
        add(
            "GumbelClip step",
            f"batch {batch}, Gumbel rollout of {ROLLOUT_TOKENS} steps",
            "s/step",
            step("gumbel", batch, lambda parts: step_seconds(parts, GUMBEL_PARTS)),
        )
    add(
        "feature extraction",
        f"small: tiny CLIP, 64 px; gpt2-small: ViT-B/32 shape, 224 px; PNGs, batch {EXTRACTION_BATCH}, "
        f"{EXTRACTION_WORKERS} workers",
        "images/s",
        lambda r: None if r.extraction is None else r.extraction[0],
    )
    return rows


def cell(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit == "×":
        return f"{value:.1f}"
    if unit == "%":
        return f"{value:.0f}"
    return figure(value)


def suite_table(rows: list[SuiteRow], shapes: list[str]) -> str:
    lines = [
        "| measurement | setting | unit | " + " | ".join(shapes) + " |",
        "|---|---|---|" + "---:|" * len(shapes),
    ]
    for row in rows:
        cells = " | ".join(cell(row.values[shape], row.unit) for shape in shapes)
        lines.append(f"| {row.measurement} | {row.setting} | {row.unit} | {cells} |")
    return "\n".join(lines)


def split_table(title: str, results: dict[str, dict[int, dict[str, float]]], names: tuple[str, ...]) -> str:
    """Median seconds by part, one row per shape and batch; ``step`` is the whole step."""
    measured = [
        (shape, batch, parts) for shape, by_batch in results.items() for batch, parts in by_batch.items()
    ]
    if not measured:
        return ""
    columns = list(dict.fromkeys(part for _, _, parts in measured for part in parts if part != "step"))
    lines = [
        title,
        "",
        "| shape | batch | " + " | ".join(columns) + " | step |",
        "|---|---:|" + "---:|" * (len(columns) + 1),
    ]
    for shape, batch, parts in measured:
        cells = " | ".join(f"{figure(parts[c])} s" if c in parts else "–" for c in columns)
        lines.append(f"| {shape} | {batch} | {cells} | {figure(step_seconds(parts, names))} s |")
    return "\n".join(lines)


def verdicts(results: dict[str, ShapeResults], batches: tuple[int, ...]) -> list[str]:
    """The three CPU targets, met or not met per shape."""
    lines = []

    def verdict(met: bool) -> str:
        return "met" if met else "not met"

    for setting, _, _ in training_settings():
        shares = {
            shape: r.training_share(setting)
            for shape, r in results.items()
            if setting in r.training and r.matmul_rate
        }
        if shares:
            cells = [f"{s} {100 * x:.0f} % ({verdict(x >= CE_TARGET)})" for s, x in shares.items()]
            lines.append(
                f"- Target: cross-entropy training, {setting}, at ≥ {100 * CE_TARGET:.0f} % of the matrix "
                f"products' FLOP/s measured in this run: {'; '.join(cells)}."
            )
    speedups = {
        shape: r.generation.batched_beam / r.generation.naive_beam
        for shape, r in results.items()
        if r.generation is not None
    }
    if speedups:
        cells = [f"{s} {x:.1f}× ({verdict(x >= BEAM_TARGET)})" for s, x in speedups.items()]
        lines.append(f"- Target: beam-{BEAMS} speed-up over naive ≥ {BEAM_TARGET:.0f}×: {'; '.join(cells)}.")
    shares = {
        shape: overhead_share(r.discritune[batches[0]])
        for shape, r in results.items()
        if batches[0] in r.discritune
    }
    if shares:
        cells = [f"{s} {100 * x:.0f} % ({verdict(x < OVERHEAD_TARGET)})" for s, x in shares.items()]
        lines.append(
            f"- Target: DiscriTune step at batch {batches[0]} (the default, teacher-forced log π) with < "
            f"{100 * OVERHEAD_TARGET:.0f} % of its time outside {', '.join(DISCRITUNE_CORE)}: {'; '.join(cells)}."
        )
    return lines


def unmet_profiles(results: dict[str, ShapeResults], batches: tuple[int, ...]) -> str:
    """For each target not met, what is left: the operator profile of the workload (cross-entropy, beam
    search) or, for DiscriTune, its overhead parts."""
    sections = []
    for shape, r in results.items():
        for setting, _, _ in training_settings():
            name = f"cross-entropy training, {setting}"
            if name in r.profiles and r.training_share(setting) < CE_TARGET:
                sections.append((f"{shape}, {name}, one step", r.profiles[name]))
        beam = f"batched beam {BEAMS}"
        generation = r.generation
        if (
            generation is not None
            and beam in r.profiles
            and generation.batched_beam / generation.naive_beam < BEAM_TARGET
        ):
            sections.append((f"{shape}, {beam}, one call of {GENERATION_IMAGES} images", r.profiles[beam]))
        parts = r.discritune.get(batches[0])
        if parts is not None and overhead_share(parts) >= OVERHEAD_TARGET:
            overhead = sorted(
                (
                    (part, seconds)
                    for part, seconds in parts.items()
                    if part not in (*DISCRITUNE_CORE, "step")
                ),
                key=lambda item: item[1],
                reverse=True,
            )
            lines = ["| part outside the core | time | share of the step |", "|---|---:|---:|"]
            lines += [
                f"| {part} | {figure(seconds)} s | {100 * seconds / parts['step']:.1f} % |"
                for part, seconds in overhead
            ]
            sections.append((f"{shape}, DiscriTune step at batch {batches[0]}, median", lines))
    if not sections:
        return ""
    blocks = [
        f"Profiles of the targets not met ({shape_and_workload}):\n\n" + "\n".join(lines)
        for shape_and_workload, lines in sections
    ]
    why = (
        "What these profiles leave besides the matrix products, and why it is not removable on a CPU: "
        'docs/benchmarks.md, "Against the targets".'
    )
    return "\n\n".join([*blocks, why])


def notes(
    results: dict[str, ShapeResults], plans: dict[str, SuitePlan], groups: list[str], batches: tuple[int, ...]
) -> list[str]:
    lines = []
    for shape, result in results.items():
        spec = SHAPES[shape]
        size = f", {result.parameters / 1e6:.1f} M LM parameters" if result.parameters else ""
        lines.append(
            f"- {shape}: GPT-2 shape, {spec.n_layer} layers × {spec.n_embd} wide, {spec.n_head} heads, "
            f"{spec.vocab_size} ids{size}, random weights."
        )
    lines += [
        f"- Training: batch {TRAIN_BATCH}, captions of exactly 20 tokens, prefix {PREFIX_LENGTH}, random CLIP "
        f"features of {CLIP_DIM}; tokenize, forward, backward, AdamW step, zero grads.",
        f"- Model FLOPs of a training sample (`benchmarks.model_flops`, matrix products only, 2 FLOPs a "
        f"multiply-add): {FLOP_FORMULA}. The matrix-product rate (`matmul_rate`) is `torch.mm` alone on the "
        f"LM's products of a batch-{TRAIN_BATCH} step (per layer Q/K/V, output, MLP up and down; the head), each "
        "in its forward, input-gradient and weight-gradient orientation, as often as the step runs it, median "
        "of 3 rounds; the share is samples/s × model FLOPs per sample / that rate.",
        f"- Generation: {NEW_TOKENS} new tokens per caption, no stops (`DecodingConfig(ignore_stops=True, "
        f"max_new_tokens={NEW_TOKENS})`; the naive decoders with stop_ids=[]), lengths checked. The naive reference "
        "(`naive_greedy`, `naive_beam_search`) decodes one image at a time and re-runs the whole prefix + "
        "caption at each step; its captions/s is measured in this run on a few images.",
        f"- DiscriTune (`bench_discritune.bench_shape`): greedy rollout of exactly {ROLLOUT_TOKENS} tokens, "
        "receiver CLIP of the ViT-B/32 shape (random), mapper and LM trained, Adam. Its core is "
        f"{', '.join(DISCRITUNE_CORE)} (the receiver: its `encode_text`; the teacher-forced pass: the "
        "captioner's forward); the overhead share is the rest of the step.",
        f"- GumbelClip (`bench_gumbel_clip`): the objective's own forward, a rollout of exactly {ROLLOUT_TOKENS} "
        "steps (its stop ids replaced by one no LM emits), temperature 1, straight-through, KV cache, no "
        "checkpoint_steps; captions read by a random CLIP of the ViT-B/32 shape through the vocabulary bridge "
        "of a tokenizer covering every LM id; mapper and LM trained, Adam.",
        f"- Feature extraction: one fresh `extract_entries` run (PNG decoding, preprocessing, the vision tower, "
        f"cache writes), batch {EXTRACTION_BATCH}, {EXTRACTION_WORKERS} decoding workers. small column: the "
        "synthetic world's tiny CLIP on its 64 px training images; gpt2-small column: a random CLIP of the "
        "ViT-B/32 shape (224 px, patch 32, 12 × 768 vision tower) on 224 px synthetic scenes.",
    ]
    for shape, result in results.items():
        plan = plans[shape]
        counts = []
        if "training" in groups:
            counts.append(
                f"training median of {plan.captioner.train_steps} step(s) after {plan.captioner.train_warmup} "
                "warm-up step(s)"
            )
        if "generation" in groups:
            agreement = result.generation.greedy_agreement if result.generation else 0
            counts.append(
                f"batched generation median of {plan.captioner.generation_repeats} call(s) after an 8-token "
                f"warm-up call, naive decoders one pass on {plan.captioner.naive_images} image(s) (naive "
                f"greedy ids equal batched ones on {agreement}/{plan.captioner.naive_images})"
            )
        steps = ", ".join(f"{plan.steps_at(i)} at batch {b}" for i, b in enumerate(batches))
        if "discritune" in groups:
            counts.append(f"DiscriTune one warm-up step then median of {steps}")
        if "gumbel" in groups:
            counts.append(
                f"GumbelClip one warm-up step ({WARMUP_TOKENS}-step rollout) then median of {steps}"
            )
        if result.extraction is not None:
            counts.append(f"extraction of {result.extraction[1]} images")
        lines.append(f"- Iterations, {shape}: " + "; ".join(counts) + ".")
    return lines


# ------------------------------------------------------------------------------------------ the run


def run_shape(
    shape: str,
    plan: SuitePlan,
    groups: list[str],
    batches: tuple[int, ...],
    device: torch.device,
    started: float,
) -> ShapeResults:
    """Measures every row of ``groups`` for ``shape``."""
    result = ShapeResults()

    def done(what: str) -> None:
        release(device)
        print(f"[{shape}] {what} ({time.perf_counter() - started:.0f} s into the run)", flush=True)

    profiling = device.type == "cpu"
    if "training" in groups or "generation" in groups:
        with tempfile.TemporaryDirectory(prefix="clipcap-bench-") as folder:
            result.parameters = save_random_gpt2(SHAPES[shape], Path(folder))
            if "training" in groups:
                result.matmul_rate = matmul_rate(shape, device)
                done(f"matrix products alone: {result.matmul_rate / 1e9:.1f} GFLOP/s")
                for setting, mapper, trainable in training_settings():
                    spec = SHAPES[shape]
                    result.training_flops[setting] = setting_flops(
                        spec.n_layer,
                        spec.n_embd,
                        spec.vocab_size,
                        mapper,
                        trainable,
                        CAPTION_TOKENS,
                        CLIP_DIM,
                    ).total

                    def profile(step: Callable[[], None], rate: float, setting: str = setting) -> None:
                        result.training[setting] = rate
                        if profiling and result.training_share(setting) < CE_TARGET:
                            result.profiles[f"cross-entropy training, {setting}"] = op_profile(step)

                    rate = bench_training(
                        Path(folder), mapper, trainable, device, "float32", plan.captioner, after=profile
                    )
                    result.training[setting] = rate
                    done(
                        f"training, {setting}: {figure(rate)} samples/s, "
                        f"{100 * result.training_share(setting):.0f} % of the matrix-product rate"
                    )
            if "generation" in groups:

                def profile_beam(call: Callable[[], object], speedup: float) -> None:
                    if profiling and speedup < BEAM_TARGET:
                        result.profiles[f"batched beam {BEAMS}"] = op_profile(call)

                result.generation = bench_generation(
                    Path(folder), device, "float32", plan.captioner, after_beam=profile_beam
                )
                g = result.generation
                done(
                    f"generation captions/s: greedy {figure(g.batched_greedy)}, beam {figure(g.batched_beam)}, "
                    f"naive greedy {figure(g.naive_greedy)}, naive beam {figure(g.naive_beam)}"
                )
    if "discritune" in groups:
        for index, batch in enumerate(batches):
            for from_rollout in (False, True):
                parts = bench_discritune(shape, batch, plan.steps_at(index), device, from_rollout)
                (result.discritune_fused if from_rollout else result.discritune)[batch] = parts
                how = ", log π from the rollout" if from_rollout else ""
                done(f"DiscriTune batch {batch}{how}: {figure(step_seconds(parts, DISCRITUNE_PARTS))} s/step")
    if "gumbel" in groups:
        captioner, objective = gumbel_clip_setup(shape, device)
        for index, batch in enumerate(batches):
            parts = bench_gumbel_clip(captioner, objective, batch, plan.steps_at(index), device)
            result.gumbel[batch] = parts
            done(f"GumbelClip batch {batch}: {figure(parts['step'])} s/step")
        del captioner, objective
    if "extraction" in groups:
        if shape == "small":
            result.extraction = bench_extraction(
                ensure_world(), plan.extraction_images, EXTRACTION_WORKERS, device.type, EXTRACTION_BATCH
            )
        else:
            result.extraction = bench_vit_b32_extraction(plan.extraction_images, device.type)
        done(f"extraction: {figure(result.extraction[0])} images/s ({result.extraction[1]} images)")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes", default="small,gpt2-small", help=f"comma-separated, from {sorted(SHAPES)}"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewest iterations, every row: a smoke check")
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated row groups, from {GROUPS}")
    parser.add_argument(
        "--write", type=Path, default=None, help="write/update the block in this markdown file"
    )
    # Step batches other than 32 and 100, for the test suite's smoke run.
    parser.add_argument("--batches", default=",".join(map(str, STEP_BATCHES)), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    shapes = [name.strip() for name in args.shapes.split(",") if name.strip()]
    if not shapes or any(name not in SHAPES for name in shapes):
        parser.error(f"--shapes: choose from {sorted(SHAPES)}, got {args.shapes!r}")
    groups = [group.strip() for group in args.only.split(",") if group.strip()]
    if not groups or any(group not in GROUPS for group in groups):
        parser.error(f"--only: choose from {GROUPS}, got {args.only!r}")
    batches = tuple(int(batch) for batch in args.batches.split(","))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    quiet_libraries()
    plans = {shape: QUICK_PLAN if args.quick else PLANS[shape] for shape in shapes}

    command = command_line(__file__, argv)
    machine = machine_description(device, "float32", torch.get_num_threads())
    date = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}"
    load_start = load_average()
    print(f"command: {command}\ndate: {date}\nmachine: {machine}\nload average: {load_start}", flush=True)

    started = time.perf_counter()
    results = {shape: run_shape(shape, plans[shape], groups, batches, device, started) for shape in shapes}
    seconds = time.perf_counter() - started

    # Other processes on a shared machine take cores from the benchmark's threads: record how busy it was.
    load = f"1-minute load average {load_start} at start, {load_average()} at end ({os.cpu_count()} cores)"
    title = f"### Benchmark suite, {device.type}" + (" (quick smoke run, not figures)" if args.quick else "")
    parts = [
        title,
        f"- Command: `{command}`\n- Date (UTC): {date}\n- Machine: {machine}\n- Load: {load}\n"
        f"- Run time: {seconds:.0f} s",
        suite_table(suite_rows(results, batches), shapes),
        "\n".join(verdicts(results, batches) + notes(results, plans, groups, batches)),
        unmet_profiles(results, batches),
        split_table(
            "DiscriTune step (teacher-forced log π, the default) split by part (median seconds):",
            {shape: r.discritune for shape, r in results.items()},
            DISCRITUNE_PARTS,
        ),
        split_table(
            "DiscriTune step with `log_probs_from_rollout`, split by part (median seconds; the log-prob "
            "pass only picks log π from the rollout's logits):",
            {shape: r.discritune_fused for shape, r in results.items()},
            DISCRITUNE_PARTS,
        ),
        split_table(
            "GumbelClip step split by part (median seconds):",
            {shape: r.gumbel for shape, r in results.items()},
            GUMBEL_PARTS,
        ),
    ]
    block = "\n\n".join(part for part in parts if part)
    print("\n" + block, flush=True)
    if args.write is not None:
        write_markdown(args.write, f"suite-{device.type}", block)
        print(f"\nwrote {args.write}")


if __name__ == "__main__":
    main()
