"""Speed benchmarks for the captioner: cross-entropy training and caption generation.

Measures, for GPT-2-shaped LMs with random weights (no downloads):

1. cross-entropy training samples/s: one full step (tokenize, forward, backward, AdamW, zero grads) on a
   batch of 32 captions of exactly 20 tokens (EOS included), for (a) an MLP mapper with a finetuned LM and
   (b) ClipCap's 8-layer Transformer mapper with a frozen LM;
2. caption generation captions/s: 32 images, exactly 40 new tokens each (no stops:
   ``DecodingConfig(max_new_tokens=40, ignore_stops=True)``), greedy and beam 5, through
   ``ClipCaptioner.generate_ids`` (batched, KV-cached ``transformers`` generation);
3. the naive reference decoders (``naive_greedy``, ``naive_beam_search``: one image at a time, whole
   sequence re-run each step, as the original ClipCap) in the same run, with no stop ids so that they also
   run 40 steps, on fewer images; and the speed-up of 2. over 3.

Run:
    .venv/bin/python -m benchmarks.bench_captioner [--shapes small,gpt2-small] [--threads N]
        [--device cpu|cuda] [--dtype float32|bfloat16] [--quick] [--write docs/benchmarks.md]

``--dtype bfloat16`` trains under bf16 autocast with fp32 weights (mixed precision, as ``bf16-mixed``) and
generates with the LM's weights in bf16 (the mapper stays fp32; ``ClipCaptioner.prefix`` casts its output).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import os
import platform
import random
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from benchmarks.naive_decoders import naive_beam_search, naive_greedy
from clipcap.captioner import ClipCaptioner
from clipcap.data.batch import CaptionBatch
from clipcap.generation import DecodingConfig
from clipcap.lm import PrefixLM
from clipcap.mapper import MapperFactory, MLPMapper, TransformerMapper
from clipcap.objectives import CrossEntropy

CLIP_DIM = 512
PREFIX_LENGTH = 10
TRANSFORMER_MAPPER_LAYERS = 8  # ClipCap's Transformer mapper depth
TRAIN_BATCH = 32
CAPTION_TOKENS = 20  # EOS included
GENERATION_IMAGES = 32
NEW_TOKENS = 40
BEAMS = 5
BEAM_TARGET = 40.0  # batched beam-5 captions/s must be at least this many times the naive decoder's (issue 8)

CORPUS = [
    "a red circle on the left of a small blue square.",
    "two shapes on a grey background, one of them a large green triangle.",
    "a yellow star at the top next to an orange square in the centre!",
    "look, a purple circle and a brown triangle near the bottom right corner.",
    "a man riding a bicycle down a busy city street at night.",
    "a group of people standing around a kitchen table with plates of food.",
] * 4


@dataclass(frozen=True)
class Shape:
    """A GPT-2-shaped LM: ``n_layer`` blocks of width ``n_embd`` with ``n_head`` heads, ``vocab_size`` ids."""

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int


SHAPES = {
    "small": Shape("small", n_layer=4, n_embd=256, n_head=4, vocab_size=8192),
    "gpt2-small": Shape("gpt2-small", n_layer=12, n_embd=768, n_head=12, vocab_size=50257),
}


@dataclass(frozen=True)
class Plan:
    """How many iterations each measurement runs.

    Attributes:
        train_warmup: untimed training steps first.
        train_steps: timed training steps (the median is reported).
        generation_repeats: timed batched generation calls per decoder (the median is reported); each is
            preceded by one untimed call on the full batch with fewer new tokens.
        naive_images: images the naive decoders run on (one at a time; one timed pass).
    """

    train_warmup: int
    train_steps: int
    generation_repeats: int
    naive_images: int


FULL = Plan(train_warmup=1, train_steps=3, generation_repeats=3, naive_images=4)
QUICK = Plan(train_warmup=1, train_steps=1, generation_repeats=1, naive_images=1)


@dataclass
class Row:
    """One measured figure."""

    shape: str
    measurement: str
    setting: str
    value: float
    unit: str


def save_random_gpt2(shape: Shape, folder: Path, seed: int = 0) -> int:
    """Saves a randomly initialised GPT-2-shaped LM with a small byte-level BPE tokenizer.

    Returns the LM's parameter count.

    The tokenizer knows only a few hundred ids while the model has ``shape.vocab_size``: the LM head's cost,
    which matters for speed, is that of the full vocabulary; ``PrefixLM`` only needs the tokenizer's EOS.
    """
    torch.manual_seed(seed)
    raw = tokenizers.Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=shape.vocab_size,
        n_positions=1024,
        n_embd=shape.n_embd,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.num_parameters()


def training_captions(tokenizer, count: int, seed: int = 0) -> list[str]:
    """``count`` captions of random corpus words, each at least ``CAPTION_TOKENS - 1`` tokens long.

    The captioner cuts targets to ``CAPTION_TOKENS`` (EOS included), so every row is exactly that long.
    """
    rng = random.Random(seed)
    words = sorted({word for sentence in CORPUS for word in sentence.split()})
    captions = []
    for _ in range(count):
        caption = rng.choice(words)
        while len(tokenizer(caption, add_special_tokens=False)["input_ids"]) < CAPTION_TOKENS - 1:
            caption += " " + rng.choice(words)
        captions.append(caption)
    return captions


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds per call of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones (device synced)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def autocast(device: torch.device, dtype: str) -> AbstractContextManager:
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_training(
    folder: Path,
    mapper: MapperFactory,
    trainable_lm: bool,
    device: torch.device,
    dtype: str,
    plan: Plan,
    batch_size: int = TRAIN_BATCH,
    after: Callable[[Callable[[], None], float], None] | None = None,
) -> float:
    """Cross-entropy training samples/s at ``batch_size``: tokenize + forward + backward + AdamW step + zero
    grads. ``after``, if given, is called with the step function and the samples/s once the timing is done
    (to profile the step)."""
    torch.manual_seed(0)
    captioner = ClipCaptioner(
        PrefixLM(str(folder), trainable=trainable_lm),
        mapper,
        clip_dim=CLIP_DIM,
        max_caption_tokens=CAPTION_TOKENS,
    ).to(device)
    captioner.train()
    objective = CrossEntropy()
    parameters = [p for p in captioner.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5, fused=True)  # as the configs
    batch = CaptionBatch(
        image_ids=[str(i) for i in range(batch_size)],
        clip_features=torch.randn(batch_size, CLIP_DIM, device=device),
        captions=training_captions(captioner.tokenizer, batch_size),
    )
    tokens = captioner.encode_captions(batch.captions)
    if tokens.input_ids.shape != (batch_size, CAPTION_TOKENS) or not bool(tokens.attention_mask.all()):
        raise RuntimeError(f"training captions are not all {CAPTION_TOKENS} tokens: {tokens.input_ids.shape}")

    def step() -> None:
        with autocast(device, dtype):
            loss = objective(captioner, batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rate = batch_size / statistics.median(timed(step, plan.train_warmup, plan.train_steps, device))
    if after is not None:
        after(step, rate)
    return rate


def training_settings() -> list[tuple[str, MapperFactory, bool]]:
    """The two trained set-ups: ``(setting, mapper factory, whether the LM trains)``."""
    mlp = functools.partial(MLPMapper, prefix_length=PREFIX_LENGTH)
    transformer = functools.partial(
        TransformerMapper, prefix_length=PREFIX_LENGTH, clip_length=10, num_layers=TRANSFORMER_MAPPER_LAYERS
    )
    return [
        ("MLP mapper + finetuned LM", mlp, True),
        (f"Transformer mapper ({TRANSFORMER_MAPPER_LAYERS} layers) + frozen LM", transformer, False),
    ]


def check_lengths(ids: list[list[int]], what: str) -> None:
    lengths = sorted({len(row) for row in ids})
    if lengths != [NEW_TOKENS]:
        raise RuntimeError(f"{what}: expected every caption to be {NEW_TOKENS} tokens, got lengths {lengths}")


@dataclass
class GenerationResult:
    batched_greedy: float
    batched_beam: float
    naive_greedy: float
    naive_beam: float
    greedy_agreement: int
    """Images (of the naive ones) whose naive greedy ids equal the batched greedy ids."""


def bench_generation(
    folder: Path,
    device: torch.device,
    dtype: str,
    plan: Plan,
    after_beam: Callable[[Callable[[], object], float], None] | None = None,
) -> GenerationResult:
    """Captions/s of batched KV-cached generation and of the naive decoders, 40 new tokens each.
    ``after_beam``, if given, is called with the batched beam-5 call and its speed-up over the naive beam
    search once both are timed (to profile the call)."""
    torch.manual_seed(0)
    lm = PrefixLM(str(folder), trainable=False, dtype=dtype)
    captioner = ClipCaptioner(
        lm, functools.partial(MLPMapper, prefix_length=PREFIX_LENGTH), clip_dim=CLIP_DIM
    ).to(device)
    captioner.eval()
    features = torch.randn(GENERATION_IMAGES, CLIP_DIM, device=device)
    naive_features = features[: plan.naive_images]

    def batched(num_beams: int) -> tuple[float, list[list[int]]]:
        decoding = DecodingConfig(num_beams=num_beams, max_new_tokens=NEW_TOKENS, ignore_stops=True)
        warmup = DecodingConfig(num_beams=num_beams, max_new_tokens=8, ignore_stops=True)
        outputs: list[list[list[int]]] = []
        with torch.no_grad():
            captioner.generate_ids(features, warmup)
            seconds = timed(
                lambda: outputs.append(captioner.generate_ids(features, decoding)),
                0,
                plan.generation_repeats,
                device,
            )
        check_lengths(outputs[-1], f"generate_ids(num_beams={num_beams})")
        if len(outputs[-1]) != GENERATION_IMAGES:
            raise RuntimeError(f"expected {GENERATION_IMAGES} captions, got {len(outputs[-1])}")
        return GENERATION_IMAGES / statistics.median(seconds), outputs[-1]

    def naive(
        decode: Callable[[torch.Tensor, int], list[list[int]]], what: str
    ) -> tuple[float, list[list[int]]]:
        outputs: list[list[list[int]]] = []
        with torch.no_grad():
            decode(captioner.prefix(naive_features[:1]), 4)
            seconds = timed(
                lambda: outputs.append(decode(captioner.prefix(naive_features), NEW_TOKENS)), 0, 1, device
            )
        check_lengths(outputs[-1], what)
        return plan.naive_images / seconds[0], outputs[-1]

    greedy_rate, greedy_ids = batched(1)
    beam_rate, _ = batched(BEAMS)
    naive_greedy_rate, naive_greedy_ids = naive(
        lambda prefix, steps: naive_greedy(lm, prefix, steps, stop_ids=[]), "naive_greedy"
    )
    naive_beam_rate, _ = naive(
        lambda prefix, steps: naive_beam_search(lm, prefix, BEAMS, steps, stop_ids=[]), "naive_beam_search"
    )
    if after_beam is not None:
        beam = DecodingConfig(num_beams=BEAMS, max_new_tokens=NEW_TOKENS, ignore_stops=True)
        with torch.no_grad():
            after_beam(lambda: captioner.generate_ids(features, beam), beam_rate / naive_beam_rate)
    agreement = sum(a == b for a, b in zip(naive_greedy_ids, greedy_ids, strict=False))
    return GenerationResult(greedy_rate, beam_rate, naive_greedy_rate, naive_beam_rate, agreement)


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "unknown"


def machine_description(device: torch.device, dtype: str, threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
        if match:
            cpu = match.group(1).strip()
    except OSError:
        pass
    parts = [
        f"CPU {cpu} ({os.cpu_count()} cores visible, torch threads {threads})",
        f"device {device.type}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        f"dtype {dtype}",
        f"torch {torch.__version__}",
        f"transformers {transformers.__version__}",
        f"Python {platform.python_version()}",
    ]
    return ", ".join(parts)


def figure(value: float) -> str:
    """Three significant figures, without exponents: 68.2, 3.50, 0.0443."""
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def markdown_tables(rows: list[Row], results: dict[str, GenerationResult], plan: Plan) -> str:
    lines = [
        "| shape | measurement | setting | throughput |",
        "|---|---|---|---:|",
    ]
    for row in rows:
        lines.append(f"| {row.shape} | {row.measurement} | {row.setting} | {figure(row.value)} {row.unit} |")
    lines += [
        "",
        f"Speed-up of batched KV-cached generation over the naive decoders (captions/s; naive on "
        f"{plan.naive_images} image(s) one at a time, batched on {GENERATION_IMAGES}); "
        f"target: beam {BEAMS} ≥ {BEAM_TARGET:.0f}×.",
        "",
        "| shape | decoder | batched | naive | speed-up | target |",
        "|---|---|---:|---:|---:|---|",
    ]
    for shape, result in results.items():
        greedy = result.batched_greedy / result.naive_greedy
        beam = result.batched_beam / result.naive_beam
        lines.append(
            f"| {shape} | greedy | {figure(result.batched_greedy)} | {figure(result.naive_greedy)} "
            f"| {greedy:.1f}× | – |"
        )
        verdict = "met" if beam >= BEAM_TARGET else "not met"
        lines.append(
            f"| {shape} | beam {BEAMS} | {figure(result.batched_beam)} | {figure(result.naive_beam)} | {beam:.1f}× "
            f"| ≥ {BEAM_TARGET:.0f}×: {verdict} |"
        )
    return "\n".join(lines)


def notes(results: dict[str, GenerationResult], plan: Plan, parameters: dict[str, int]) -> str:
    lines = [
        f"- Training: batch {TRAIN_BATCH}, captions of {CAPTION_TOKENS} tokens (EOS included), prefix "
        f"{PREFIX_LENGTH}, CLIP features {CLIP_DIM}; median of {plan.train_steps} step(s) after "
        f"{plan.train_warmup} warm-up step(s). Transformer mapper: {TRANSFORMER_MAPPER_LAYERS} layers "
        "(as ClipCap), 8 heads, 10 CLIP tokens.",
        f"- Generation: {NEW_TOKENS} new tokens per caption (ignore_stops, max_new_tokens = {NEW_TOKENS}, "
        f"lengths checked), 1 caption per image; batched figures are the median of "
        f"{plan.generation_repeats} call(s) after a warm-up call; naive decoders run on "
        f"{plan.naive_images} image(s), one pass, stop_ids=[].",
    ]
    for shape, result in results.items():
        lines.append(
            f"- {shape}: {parameters[shape] / 1e6:.1f} M LM parameters; naive greedy ids equal batched "
            f"greedy ids on {result.greedy_agreement}/{plan.naive_images} image(s)."
        )
    return "\n".join(lines)


def write_markdown(path: Path, key: str, block: str) -> None:
    """Creates ``path`` or replaces (or appends) the block delimited by ``<!-- bench:key -->`` markers."""
    begin, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    section = f"{begin}\n{block.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that runs ``script`` (a benchmark module's ``__file__``) with this process's arguments,
    or with ``argv`` when called in-process: ``python -m benchmarks.<name> ...``."""
    python = os.path.relpath(sys.executable)
    python = sys.executable if python.startswith("..") else python
    module = f"benchmarks.{Path(script).stem}"
    return shlex.join([python, "-m", module, *(sys.argv[1:] if argv is None else argv)])


def run_lines(command: str, machine: str, load_before: str) -> list[str]:
    """The Command, Date (now, UTC), Machine and Load lines a benchmark block starts with; the load at the
    end is read now."""
    return [
        f"- Command: `{command}`",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {machine}",
        f"- Load: 1-minute load average {load_before} at start, {load_average()} at end",
    ]


def publish_side_by_side(
    title: str,
    script: str,
    argv: list[str] | None,
    load_before: str,
    setting: str,
    table: list[str],
    write: Path | None,
    key: str,
) -> None:
    """Prints the markdown block of a single-thread CPU before/after benchmark (its title, the run lines of
    ``script``, a module's ``__file__``, run with ``argv``, one line on the setting, and the table) and, if
    ``write`` is given, puts it in that file under the ``key`` markers."""
    machine = machine_description(torch.device("cpu"), "float32", 1)
    block = "\n".join(
        [title, "", *run_lines(command_line(script, argv), machine, load_before), f"- {setting}", "", *table]
    )
    print(block)
    if write:
        write_markdown(write, key, block)


def quiet_libraries() -> None:
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes", default="small,gpt2-small", help=f"comma-separated, from {sorted(SHAPES)}"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2 on CPU)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="fewest iterations: a smoke check, not figures")
    parser.add_argument("--write", type=Path, default=None, help="write/update this markdown file")
    args = parser.parse_args(argv)

    names = [name.strip() for name in args.shapes.split(",") if name.strip()]
    unknown = [name for name in names if name not in SHAPES]
    if unknown or not names:
        parser.error(f"--shapes: unknown {unknown}; choose from {sorted(SHAPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    threads = args.threads if args.threads is not None else (2 if device.type == "cpu" else None)
    if threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    plan = QUICK if args.quick else FULL
    quiet_libraries()

    command = command_line(__file__, argv)
    machine = machine_description(device, args.dtype, threads)
    date = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    load_start = load_average()
    print(f"command: {command}\ndate: {date}\nmachine: {machine}" + ("\n(quick run)" if args.quick else ""))
    print(f"load average at start: {load_start}", flush=True)

    rows: list[Row] = []
    results: dict[str, GenerationResult] = {}
    parameters: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="clipcap-bench-") as tmp:
        for name in names:
            shape = SHAPES[name]
            folder = Path(tmp) / name
            parameters[name] = save_random_gpt2(shape, folder)
            start = time.perf_counter()
            for setting, mapper, trainable in training_settings():
                rate = bench_training(folder, mapper, trainable, device, args.dtype, plan)
                release(device)
                rows.append(Row(name, "CE training step", setting, rate, "samples/s"))
                print(f"[{name}] training, {setting}: {figure(rate)} samples/s", flush=True)
            result = bench_generation(folder, device, args.dtype, plan)
            release(device)
            results[name] = result
            for setting, rate in [
                ("batched greedy (generate_ids, KV cache)", result.batched_greedy),
                (f"batched beam {BEAMS} (generate_ids, KV cache)", result.batched_beam),
                ("naive greedy (one image, no cache)", result.naive_greedy),
                (f"naive beam {BEAMS} (one image, no cache)", result.naive_beam),
            ]:
                rows.append(Row(name, f"generation, {NEW_TOKENS} tokens", setting, rate, "captions/s"))
                print(f"[{name}] {setting}: {figure(rate)} captions/s", flush=True)
            print(f"[{name}] done in {time.perf_counter() - start:.0f} s", flush=True)

    # Other processes on a shared machine take cores from the benchmark's threads: record how busy it was.
    load = f"1-minute load average {load_start} at start, {load_average()} at end ({os.cpu_count()} cores)"
    tables = markdown_tables(rows, results, plan)
    details = notes(results, plan, parameters)
    print("\n" + tables + "\n\n" + details + "\n- " + load)
    if args.write is not None:
        title = f"### {'GPU' if device.type == 'cuda' else 'CPU'}, {args.dtype}" + (
            " (quick smoke run, not figures)" if args.quick else ""
        )
        block = "\n\n".join(
            [
                title,
                f"- Command: `{command}`\n- Date: {date}\n- Machine: {machine}\n- Load: {load}",
                tables,
                details,
            ]
        )
        write_markdown(args.write, f"{device.type}-{args.dtype}", block)
        print(f"\nwrote {args.write}")


if __name__ == "__main__":
    main()
