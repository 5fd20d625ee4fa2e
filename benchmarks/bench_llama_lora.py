"""LLaMA-2-7B with LoRA on one GPU: peak memory and step time of cross-entropy and DiscriTune steps.

On CUDA, for a LLaMA-2-7B-shaped ``LlamaForCausalLM`` with random weights (D 4096, 32 layers, 32 heads,
MLP 11008, 32000 ids; built directly on the GPU in float16/bfloat16, never in float32 on the host) with
LoRA (r 8, alpha 16, dropout 0.05, on q_proj and v_proj) through ``clipcap.lora.apply_lora``, behind a
``ClipCaptioner`` with an ``MLPMapper`` (prefix 10, 512-d CLIP features; hidden width ClipCap's P·D/2, or
the narrower D/2), AdamW (the project's default optimizer) on the mapper and the adapters:

- a cross-entropy step: ``CrossEntropy`` on captions of exactly 20 tokens (EOS included), backward,
  AdamW step;
- a DiscriTune step: the real ``DiscriTune`` objective, whose receiver is a CLIP of the ViT-B/32 shape
  with random weights, fed random 512-d features: greedy ``generate`` of exactly 20 tokens with a KV cache
  (stops made unreachable), CLIP scoring, one teacher-forced pass with gradient, backward, AdamW step;

each at batch 8 and at the largest batch whose peak fits 15 GiB (a 16 GB V100) and 31 GiB (a 32 GB one):
doubling from 8, then bisection; a batch that runs out of memory does not fit (the error is caught and the
cache emptied). Settings: float16/bfloat16 × gradient checkpointing off/on × no quantization / 8-bit (and
4-bit) loading through ``PrefixLM(quantization=...)`` when bitsandbytes is installed (the random model is
saved once to a scratch folder, about 13.5 GB, and loaded from there; skipped with the reason printed
otherwise). Memory is ``torch.cuda.max_memory_allocated`` over the timed steps after
``reset_peak_memory_stats`` (tensors only: the CUDA context and the allocator's reserve are not counted);
times are medians of CUDA-synchronised steps after one warm-up step (which also creates AdamW's state).
Every row shows ``benchmarks.memory_estimate.estimate_lora_memory``'s peak beside the measured one.

The captioner needs a tokenizer but no real one: a word-level tokenizer with one word per id (``w3`` …
``w31999``) decodes every id the random LM can produce, and captions of 19 random words are 20 tokens.
The unquantized model is wrapped in memory with ``PrefixLM.from_model``, which sets it up exactly as
``PrefixLM.__init__`` sets up a model it has loaded.

Without CUDA and with ``--shape 7b`` nothing is measured: the script prints ``benchmarks.memory_estimate``'s analytic
estimate for every combination (float16/bfloat16 × checkpointing × none/8-bit/4-bit × cross-entropy/
DiscriTune at batch 8, for each mapper width) with the largest batch that fits 16 GB and 32 GB by the
estimate, and ``--write`` records it as such. ``--shape tiny`` runs the measuring code on a tiny LLaMA on
whatever device there is (on a CPU: times only, no memory figure), to exercise it.

A full GPU run (32 settings, each with its batch search) takes tens of minutes; pass subsets
(``--dtypes float16 --quantization none``) to split it.

Run:
    .venv/bin/python -m benchmarks.bench_llama_lora [--shape 7b|tiny] [--dtypes float16,bfloat16]
        [--checkpointing off,on] [--quantization none,8bit] [--objectives ce,discritune]
        [--mapper-hidden clipcap,narrow] [--batch 8] [--max-batch N] [--steps 3] [--threads 1]
        [--scratch DIR] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import importlib.util
import math
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from benchmarks.bench_captioner import (
    figure,
    load_average,
    machine_description,
    quiet_libraries,
    synchronize,
    write_markdown,
)
from benchmarks.memory_estimate import (
    CARD_BUDGETS,
    CUDA_OVERHEAD_BYTES,
    GiB,
    MemoryEstimate,
    MiB,
    estimate_lora_memory,
    largest_fitting_batch,
    llama2_7b_config,
)
from clipcap.captioner import ClipCaptioner
from clipcap.clip import ClipEncoder
from clipcap.data.batch import CaptionBatch
from clipcap.generation import DecodingConfig
from clipcap.lm import PrefixLM
from clipcap.lora import LoraSettings
from clipcap.mapper import MLPMapper
from clipcap.objectives import CrossEntropy, DiscriTune
from clipcap.objectives.base import Objective

PREFIX_LENGTH = 10
CAPTION_TOKENS = 20  # EOS included
ROLLOUT_TOKENS = 20
LORA = LoraSettings(rank=8, alpha=16.0, dropout=0.05)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
QUANTIZATIONS = ("none", "8bit", "4bit")
PRECISIONS = ("true", "16-mixed")
OBJECTIVES = ("ce", "discritune")
OBJECTIVE_NAMES = {"ce": "cross-entropy", "discritune": "DiscriTune"}
V100_CONFIG = Path(__file__).resolve().parents[1] / "lightning_configs" / "coco" / "llama2_lora_ce.yaml"
"""The LLaMA-2-7B LoRA cross-entropy config sized for one 16 GB V100, whose settings
:func:`config_step` trains with."""


@dataclass(frozen=True)
class Shape:
    """The LM and receiver CLIP to build, and the CLIP feature size that feeds both."""

    name: str
    lm: LlamaConfig
    receiver: CLIPConfig
    clip_dim: int
    max_batch: int
    """Default cap of the batch search."""
    unit: str = "GiB"
    """How the tables show memory."""


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_clip_config(projection_dim: int) -> CLIPConfig:
    # openai's BPE vocabulary (49408 ids) is what ClipEncoder tokenizes with, whatever the towers' size.
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    return CLIPConfig(
        text_config=dict(vocab_size=49408, **tower),
        vision_config=dict(image_size=32, patch_size=8, **tower),
        projection_dim=projection_dim,
    )


SHAPES = {
    "7b": Shape("LLaMA-2-7B", llama2_7b_config(), CLIPConfig(), clip_dim=512, max_batch=512),
    "tiny": Shape(
        "tiny LLaMA", tiny_llama_config(), tiny_clip_config(32), clip_dim=32, max_batch=32, unit="MiB"
    ),
}


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """One word per id (``<unk>``, ``<s>``, ``</s>``, then ``w3`` …): every id decodes, every word is one id."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def random_llama(config: LlamaConfig, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """A randomly initialised LLaMA, its weights created directly in ``dtype`` on ``device``."""
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, dtype=dtype)


@dataclass(frozen=True)
class Setting:
    dtype: str
    checkpointing: bool
    quantization: str
    mapper: str
    objective: str

    def cells(self, with_mapper: bool = True) -> list[str]:
        mapper = [self.mapper] if with_mapper else []
        return [
            self.dtype,
            "on" if self.checkpointing else "off",
            self.quantization,
            *mapper,
            OBJECTIVE_NAMES[self.objective],
        ]


@dataclass(frozen=True)
class Trial:
    """One batch size tried: ``peak`` in bytes (None where not measured: CPU), median step seconds; a
    trial that ran out of memory has ``fits`` False."""

    fits: bool
    peak: int | None = None
    seconds: float = math.nan


def mapper_hidden(choice: str, shape: Shape) -> int | None:
    """``clipcap``: ClipCap's P·D/2 (None, the mapper's default); ``narrow``: D/2; or a number."""
    if choice == "clipcap":
        return None
    if choice == "narrow":
        return shape.lm.hidden_size // 2
    return int(choice)


def estimate(shape: Shape, setting: Setting, batch: int, receiver_parameters: int) -> MemoryEstimate:
    return estimate_lora_memory(
        shape.lm,
        batch,
        prefix_length=PREFIX_LENGTH,
        caption_tokens=CAPTION_TOKENS,
        dtype_bytes=2,
        quantization=None if setting.quantization == "none" else setting.quantization,
        lora_rank=LORA.rank,
        lora_targets=LORA.target_modules,
        gradient_checkpointing=setting.checkpointing,
        objective=setting.objective,
        clip_dim=shape.clip_dim,
        rollout_tokens=ROLLOUT_TOKENS,
        lora_dropout=LORA.dropout,
        mapper_hidden_dim=mapper_hidden(setting.mapper, shape),
        receiver_parameters=receiver_parameters,
        adam_foreach=False,  # the LLaMA configs use fused AdamW, which keeps no step temporary
    )


def gib(value: int | None, unit: str = "GiB") -> str:
    return "—" if value is None else f"{value / (GiB if unit == 'GiB' else MiB):.2f}"


def skip_reason(quantization: str, device: torch.device) -> str | None:
    if quantization == "none":
        return None
    if device.type != "cuda":
        return "bitsandbytes quantization needs CUDA"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install 'clipcap[quantization]')"
    return None


class Bench:
    """Builds LMs, captioners and steps for one shape on one device, and measures them."""

    def __init__(self, shape: Shape, device: torch.device, steps: int, max_batch: int, scratch: Path) -> None:
        self.shape = shape
        self.device = device
        self.steps = steps
        self.max_batch = max_batch
        self.scratch = scratch
        self.tokenizer = word_tokenizer(shape.lm.vocab_size)
        torch.manual_seed(0)
        receiver = CLIPModel(shape.receiver)
        self.receiver_parameters = sum(p.numel() for p in receiver.parameters())
        self.receiver = ClipEncoder.from_model(receiver, name=f"random {shape.name} receiver")
        rng = random.Random(0)
        words = [f"w{i}" for i in range(3, shape.lm.vocab_size)]
        self.captions = [" ".join(rng.choices(words, k=CAPTION_TOKENS - 1)) for _ in range(max_batch)]
        self.features = torch.randn(max_batch, shape.clip_dim, generator=torch.Generator().manual_seed(0))
        self.saved_folder: Path | None = None

    def language_model(self, dtype: str, checkpointing: bool, quantization: str) -> PrefixLM:
        if quantization == "none":
            model = random_llama(self.shape.lm, DTYPES[dtype], self.device)
            return PrefixLM.from_model(
                model,
                self.tokenizer,
                f"random {self.shape.name}",
                gradient_checkpointing=checkpointing,
                lora=LORA,
            )
        # bitsandbytes quantizes while loading: save the random model once, load it through PrefixLM.
        if self.saved_folder is None:
            self.saved_folder = self.scratch / "random-llama"
            model = random_llama(self.shape.lm, torch.float16, self.device)
            model.save_pretrained(self.saved_folder)
            self.tokenizer.save_pretrained(self.saved_folder)
            del model
            release(self.device)
        return PrefixLM(
            str(self.saved_folder),
            dtype=dtype,
            gradient_checkpointing=checkpointing,
            lora=LORA,
            quantization=quantization,
        )

    def step_function(
        self, captioner: ClipCaptioner, objective_name: str, precision: str = "true"
    ) -> tuple[Callable[[int], None], Callable]:
        """A full training step at a given batch size, and what to call after an out-of-memory error.

        ``precision`` as Lightning's ``trainer.precision`` runs the step: ``true`` (the weights' own dtypes,
        no autocast), or ``16-mixed`` (float16 autocast around the objective's forward and a ``GradScaler``,
        as the V100 configs train; on a CPU too, where Lightning would run bf16 instead, which cannot mix
        with a float16 base).
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        mixed = precision == "16-mixed"
        autocast = torch.autocast(self.device.type, dtype=torch.float16, enabled=mixed)
        scaler = torch.amp.GradScaler(self.device.type) if mixed else None
        objective: Objective
        if objective_name == "ce":
            objective = CrossEntropy()
        else:
            rollout = DecodingConfig(max_new_tokens=ROLLOUT_TOKENS, ignore_stops=True)
            objective = DiscriTune(rollout=rollout)
            objective.set_receiver(self.receiver)
            self.receiver.to(self.device)
        objective.train()
        captioner.train()
        optimizer = torch.optim.AdamW(
            [p for p in captioner.parameters() if p.requires_grad], lr=2e-5, fused=True
        )
        features = self.features.to(self.device)
        caption_length = captioner.encode_captions(self.captions[:1]).input_ids.shape[1]
        if caption_length != CAPTION_TOKENS:
            raise RuntimeError(f"captions are {caption_length} tokens, not {CAPTION_TOKENS}")

        def step(batch: int) -> None:
            data = CaptionBatch(
                image_ids=[str(i) for i in range(batch)],
                clip_features=features[:batch],
                captions=self.captions[:batch],
            )
            with autocast:
                output = objective(captioner, data)
            # The step must be the full one: every rollout runs all its tokens, no update is skipped.
            rollout = output.terms.get("caption_tokens")
            if output.skip or (rollout is not None and float(rollout) != ROLLOUT_TOKENS):
                raise RuntimeError(f"{objective_name} step is not the full one: {output}")
            if scaler is None:
                output.loss.backward()
                optimizer.step()
            else:
                scaler.scale(output.loss).backward()
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)

        def after_out_of_memory() -> None:
            optimizer.zero_grad(set_to_none=True)

        return step, after_out_of_memory

    def trial(self, step: Callable[[int], None], recover: Callable, batch: int, steps: int) -> Trial:
        """Warm-up step, then ``steps`` timed steps; peak memory over the timed ones (CUDA)."""
        cuda = self.device.type == "cuda"
        out_of_memory = False
        seconds: list[float] = []
        try:
            step(batch)
            synchronize(self.device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            for _ in range(steps):
                started = time.perf_counter()
                step(batch)
                synchronize(self.device)
                seconds.append(time.perf_counter() - started)
        except torch.OutOfMemoryError:
            out_of_memory = True  # handled outside the except block, where the failed step's frames are gone
        if out_of_memory:
            recover()
            release(self.device)
            return Trial(fits=False)
        peak = torch.cuda.max_memory_allocated(self.device) if cuda else None
        return Trial(fits=True, peak=peak, seconds=statistics.median(seconds))

    def measure(self, setting: Setting, captioner: ClipCaptioner, batch: int) -> str:
        """One table row: batch ``batch`` and the largest batches within the card budgets."""
        step, recover = self.step_function(captioner, setting.objective)
        trials: dict[int, Trial] = {}

        def tried(size: int) -> Trial:
            if size not in trials:
                trials[size] = self.trial(step, recover, size, self.steps if size == batch else 1)
            return trials[size]

        at_batch = tried(batch)
        cells = []
        for budget in CARD_BUDGETS.values():

            def fits(size: int, budget: int = budget) -> bool:
                result = tried(size)
                return result.fits and (result.peak is None or result.peak <= budget)

            largest = largest_fitting_batch(fits, start=batch, limit=self.max_batch)
            capped = "≥ " if largest == self.max_batch else ""
            time_cell = f" ({figure(trials[largest].seconds)} s)" if largest else ""
            cells.append(f"{capped}{largest}{time_cell}")
        self.receiver.to("cpu")
        predicted = estimate(self.shape, setting, batch, self.receiver_parameters).peak_allocated
        unit = self.shape.unit
        measured = gib(at_batch.peak, unit) if at_batch.fits else "out of memory"
        seconds = f"{figure(at_batch.seconds)} s" if at_batch.fits else "—"
        return row([*setting.cells(), measured, gib(predicted, unit), seconds, *cells])


def row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measured_tables(
    args: argparse.Namespace, shape: Shape, device: torch.device
) -> tuple[list[str], list[str]]:
    """Measures every requested setting; returns the table lines and the skip notes."""
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="clipcap-llama-"))
    bench = Bench(shape, device, args.steps, args.max_batch or shape.max_batch, scratch)
    budgets = " | ".join(
        f"largest batch ≤ {budget / GiB:.0f} GiB ({card})" for card, budget in CARD_BUDGETS.items()
    )
    lines = [
        f"| dtype | checkpointing | quantization | mapper | objective | peak, batch {args.batch} ({shape.unit}) "
        f"| estimate ({shape.unit}) | step, batch {args.batch} | {budgets} |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    notes = []
    print(lines[0], flush=True)
    try:
        for dtype in args.dtypes:
            for checkpointing in args.checkpointing:
                for quantization in args.quantization:
                    reason = skip_reason(quantization, device)
                    if reason:
                        note = f"{quantization}, {dtype}, checkpointing {'on' if checkpointing else 'off'}: skipped, {reason}"
                        notes.append(note)
                        print(note, flush=True)
                        continue
                    lm = bench.language_model(dtype, checkpointing, quantization)
                    for mapper in args.mapper_hidden:
                        torch.manual_seed(0)
                        factory = functools.partial(
                            MLPMapper, prefix_length=PREFIX_LENGTH, hidden_dim=mapper_hidden(mapper, shape)
                        )
                        # Only the mapper is built here: the LM is on the device already (bitsandbytes placed
                        # a quantized one there while loading).
                        with torch.device(device):
                            captioner = ClipCaptioner(lm, factory, clip_dim=shape.clip_dim)
                        for objective in args.objectives:
                            setting = Setting(dtype, checkpointing, quantization, mapper, objective)
                            lines.append(bench.measure(setting, captioner, args.batch))
                            print(lines[-1], flush=True)
                            release(device)
                        del captioner
                        release(device)
                    del lm
                    release(device)
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    return lines, notes


@dataclass(frozen=True)
class ConfigStep:
    """One measured training step in a config's settings.

    Attributes:
        settings: the settings, in words.
        batch: the batch size.
        trial: the measurement (``peak`` None on a CPU; ``fits`` False when it ran out of memory).
        estimate: ``estimate_lora_memory``'s peak for the same setting, bytes.
        unit: how to show memory (``GiB`` for 7B, ``MiB`` for the tiny shape).
    """

    settings: str
    batch: int
    trial: Trial
    estimate: int
    unit: str


def config_settings(path: Path = V100_CONFIG) -> dict:
    """What a LoRA config's LM, mapper, trainer and data sections set, read from its YAML: ``dtype``,
    ``gradient_checkpointing``, ``mapper_hidden``, ``precision``, ``batch_size``. Its LoRA settings must be
    :data:`LORA`'s (the bench builds the adapters with those), else ValueError."""
    config = yaml.safe_load(path.read_text())
    captioner = config["model"]["captioner"]["init_args"]
    lm = captioner["language_model"]["init_args"]
    lora = lm.get("lora") or {}
    if (lora.get("rank"), float(lora.get("alpha", 0)), lora.get("dropout")) != (
        LORA.rank,
        LORA.alpha,
        LORA.dropout,
    ):
        raise ValueError(f"{path}: LoRA {lora} is not the bench's {LORA}; update bench_llama_lora.LORA")
    return {
        "dtype": lm.get("dtype", "float32"),
        "gradient_checkpointing": bool(lm.get("gradient_checkpointing", False)),
        "mapper_hidden": captioner["mapper"]["init_args"].get("hidden_dim"),
        "precision": str(config["trainer"]["precision"]),
        "batch_size": int(config["data"]["init_args"]["batch_size"]),
    }


def config_step(shape_key: str, device: torch.device, steps: int = 3, path: Path = V100_CONFIG) -> ConfigStep:
    """A cross-entropy LoRA step of the ``shape_key`` LLaMA (``7b`` or ``tiny``, random weights) in the
    settings of the config at ``path`` (by default the V100 one: float16 base, gradient checkpointing,
    16-mixed, LoRA r 8 on q_proj and v_proj, a 1024-wide MLP mapper, batch 8; one micro-batch, its gradient
    accumulation aside), timed and, on CUDA, its peak memory measured after one warm-up step."""
    settings = config_settings(path)
    if settings["dtype"] not in DTYPES or settings["precision"] not in (*PRECISIONS, "32-true"):
        raise ValueError(f"{path}: dtype {settings['dtype']} / precision {settings['precision']} not benched")
    shape = SHAPES[shape_key]
    batch = settings["batch_size"]
    mapper = str(settings["mapper_hidden"]) if settings["mapper_hidden"] else "clipcap"
    precision = "16-mixed" if settings["precision"] == "16-mixed" else "true"
    with tempfile.TemporaryDirectory(prefix="clipcap-llama-") as scratch:
        bench = Bench(shape, device, steps, max_batch=batch, scratch=Path(scratch))
        lm = bench.language_model(settings["dtype"], settings["gradient_checkpointing"], "none")
        torch.manual_seed(0)
        factory = functools.partial(
            MLPMapper, prefix_length=PREFIX_LENGTH, hidden_dim=mapper_hidden(mapper, shape)
        )
        with torch.device(device):
            captioner = ClipCaptioner(lm, factory, clip_dim=shape.clip_dim)
        step, recover = bench.step_function(captioner, "ce", precision)
        trial = bench.trial(step, recover, batch, steps)
        del captioner, lm, step, recover
        release(device)
    setting = Setting(settings["dtype"], settings["gradient_checkpointing"], "none", mapper, "ce")
    words = (
        f"{shape.name}, random weights; {settings['dtype']} base, gradient checkpointing "
        f"{'on' if settings['gradient_checkpointing'] else 'off'}, trainer.precision {settings['precision']} "
        f"(float16 autocast and a GradScaler); LoRA r {LORA.rank}, alpha {LORA.alpha:g}, dropout {LORA.dropout} on q_proj, v_proj; MLP mapper hidden "
        f"{mapper_hidden(mapper, shape) or PREFIX_LENGTH * shape.lm.hidden_size // 2}, prefix {PREFIX_LENGTH}; "
        f"captions of {CAPTION_TOKENS} tokens; fused AdamW; batch {batch} (as {path.name})"
    )
    return ConfigStep(words, batch, trial, estimate(shape, setting, batch, 0).peak_allocated, shape.unit)


def estimate_tables(args: argparse.Namespace, shape: Shape, receiver_parameters: int) -> list[str]:
    """The analytic estimate for every combination, one table per mapper width."""
    lines: list[str] = []
    for mapper in args.mapper_hidden:
        hidden = mapper_hidden(mapper, shape) or PREFIX_LENGTH * shape.lm.hidden_size // 2
        example = estimate(shape, Setting("float16", False, "none", mapper, "ce"), args.batch, 0)
        lines += [
            "",
            f"Mapper `{mapper}`: hidden width {hidden}, {example.mapper_parameters / 1e6:.1f} M parameters; "
            f"LoRA adapters {example.adapter_parameters / 1e6:.2f} M parameters.",
            "",
            "| dtype | checkpointing | quantization | objective | base weights | mapper + adapters: weights, "
            "gradients, Adam, step temporary | activations (+ recompute) | KV cache + receiver "
            f"| peak, batch {args.batch} | peak phase | with overhead | ≤ 15 GiB | ≤ 31 GiB "
            "| largest batch, 16 GB | largest batch, 32 GB |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---|---|---:|---:|",
        ]
        for dtype in args.dtypes:
            for checkpointing in args.checkpointing:
                for quantization in QUANTIZATIONS:
                    for objective in args.objectives:
                        setting = Setting(dtype, checkpointing, quantization, mapper, objective)
                        lines.append(estimate_row(shape, setting, args.batch, receiver_parameters))
    return lines


def estimate_row(shape: Shape, setting: Setting, batch: int, receiver_parameters: int) -> str:
    """A row of the estimate table, in GiB, with the largest batch that fits each card by the estimate."""

    def at(size: int) -> MemoryEstimate:
        return estimate(shape, setting, size, receiver_parameters)

    result = at(batch)
    trainable = result.trainable_weights + result.gradients + result.adam_states + result.optimizer_temporary
    budgets = list(CARD_BUDGETS.values())
    fits = ["yes" if result.peak_allocated <= budget else "no" for budget in budgets]
    largest = [
        str(largest_fitting_batch(lambda size, budget=budget: at(size).peak_allocated <= budget, batch))
        for budget in budgets
    ]
    return row(
        [
            *setting.cells(with_mapper=False),
            gib(result.base_weights),
            gib(trainable),
            gib(result.activations + result.recompute),
            gib(result.kv_cache + result.receiver_weights),
            f"**{gib(result.peak_allocated)}**",
            result.peak_phase,
            gib(result.total),
            *fits,
            *largest,
        ]
    )


def receiver_parameter_count(config: CLIPConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in CLIPModel(config).parameters())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    parser.add_argument("--dtypes", default="float16,bfloat16", type=lambda s: s.split(","))
    parser.add_argument("--checkpointing", default="off,on", type=lambda s: [v == "on" for v in s.split(",")])
    parser.add_argument("--quantization", default="none,8bit", type=lambda s: s.split(","))
    parser.add_argument("--objectives", default="ce,discritune", type=lambda s: s.split(","))
    parser.add_argument(
        "--mapper-hidden",
        default="clipcap,narrow",
        type=lambda s: s.split(","),
        help="MLP mapper hidden widths: clipcap (P·D/2), narrow (D/2) or numbers",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=None, help="cap of the batch search (512 for 7b)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps at --batch (1 in the batch search)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--scratch", default=None, help="folder for the saved random model (8-bit/4-bit)")
    parser.add_argument("--write", type=Path, default=None, help="write the block into this markdown file")
    args = parser.parse_args(argv)
    for values, allowed, what in (
        (args.dtypes, DTYPES, "--dtypes"),
        (args.quantization, QUANTIZATIONS, "--quantization"),
        (args.objectives, OBJECTIVES, "--objectives"),
    ):
        if not set(values) <= set(allowed):
            parser.error(f"{what}: choose from {sorted(allowed)}, got {values}")
    torch.set_num_threads(args.threads)
    quiet_libraries()
    shape = SHAPES[args.shape]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    measuring = device.type == "cuda" or args.shape == "tiny"
    receiver_parameters = receiver_parameter_count(shape.receiver)
    load_before = load_average()
    command = shlex.join(
        ["python", "-m", "benchmarks.bench_llama_lora", *(sys.argv[1:] if argv is None else argv)]
    )
    now = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    settings_line = (
        f"- {shape.name}, random weights; LoRA r {LORA.rank}, alpha {LORA.alpha:g}, dropout {LORA.dropout} on "
        f"q_proj, v_proj; MLP mapper, prefix {PREFIX_LENGTH}, {shape.clip_dim}-d CLIP features; AdamW on the "
        f"mapper and adapters; cross-entropy on {CAPTION_TOKENS}-token captions; DiscriTune with a "
        f"{ROLLOUT_TOKENS}-token greedy rollout and a receiver CLIP "
        f"({receiver_parameters / 1e6:.0f} M parameters, float32)"
    )

    if measuring:
        lines, notes = measured_tables(args, shape, device)
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU)"
        title = f"### LLaMA LoRA memory and step time, {shape.name}, {gpu}"
        block = [
            title,
            "",
            f"- Command: `{command}`",
            f"- Date: {now}",
            f"- Machine: {machine_description(device, ','.join(args.dtypes), args.threads)}",
            f"- GPU: {gpu}",
            f"- Load: 1-minute load average {load_before} at start, {load_average()} at end",
            settings_line,
            "- Peak: `torch.cuda.max_memory_allocated` over the timed steps (tensors only; add about "
            f"{CUDA_OVERHEAD_BYTES / GiB:.2f} GiB for the CUDA context and allocator slack); — where not "
            "measured (CPU); estimate: `benchmarks.memory_estimate.estimate_lora_memory`'s peak; step: median "
            "CUDA-synchronised step after a warm-up step",
            *(f"- {note}" for note in notes),
            "",
            *lines,
        ]
        key = f"llama-lora-{args.shape}-{device.type}"
    else:
        lines = estimate_tables(args, shape, receiver_parameters)
        title = "### LLaMA-2-7B LoRA memory: analytic estimate, not measured (no GPU)"
        block = [
            title,
            "",
            f"- Command: `{command}`",
            f"- Date: {now}",
            "- GPU: none was lent, so nothing here is measured: every figure is "
            "`benchmarks.memory_estimate.estimate_lora_memory` (formulas in its module docstring). On a GPU the same "
            "command measures instead.",
            settings_line,
            "- GiB = 2^30 bytes. Peak: the tensors' peak, comparable to `torch.cuda.max_memory_allocated`; "
            f"with overhead: plus {CUDA_OVERHEAD_BYTES / GiB:.2f} GiB assumed for the CUDA context and "
            "allocator. A card fits when the peak is ≤ 15 GiB (16 GB V100) or ≤ 31 GiB (32 GB V100); "
            "largest batch: by the same rule, 0 when not even batch 1 fits. float16 and bfloat16 take "
            "the same memory.",
            *lines,
        ]
        key = "llama-lora-estimate"
    text = "\n".join(block)
    print()
    print(text)
    if args.write:
        write_markdown(args.write, key, text)


if __name__ == "__main__":
    main()
