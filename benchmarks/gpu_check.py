"""``make gpu-check``: one prepared GPU run, under 8 minutes on one H100, whose figures go to one file.

In order:

1. imports: which of clipcap's runtime dependencies (``pyproject.toml``) are missing or too old here, and
   whether clipcap's modules import; pycocoevalcap is refused for the whole run (an import hook raises, and
   the file lists any attempt): GPU machines cannot carry its 104 MB wheel, so nothing here may need it;
2. tests: ``pytest -m gpu tests/test_gpu.py`` in a child process on this device (``CLIPCAP_TEST_DEVICE``),
   with the same hook: every objective's ``fit`` in bf16-mixed, validation with the CLIP metrics,
   greedy / beam / sampling generation, LoRA on a tiny LLaMA;
3. cross-entropy training of the GPT-2-small shape (random weights) in bf16 autocast at batch 128, both
   settings of the benchmark suite (``bench_captioner.bench_training``), with model FLOPs utilisation
   (``benchmarks.model_flops``: matmul FLOPs per sample from the shapes, against the device's bf16 dense
   peak);
4. greedy and beam-5 captions/s at batch 32, 40 new tokens, bf16 LM weights: ``generate_ids`` as shipped,
   transformers' ``DynamicCache``, its ``StaticCache``; and, measured last because compiling is the most
   expendable cost, the static cache with ``torch.compile`` of the decoding forward (transformers'
   ``CompileConfig``);
5. one DiscriTune and one GumbelClip step at batch 100 in bf16 autocast (``bench_discritune.bench_shape``,
   ``bench_suite.bench_gumbel_clip``), split by part;
6. a LLaMA-2-7B-shaped LoRA cross-entropy step (random weights) in the settings of
   ``lightning_configs/coco/llama2_lora_ce.yaml`` (float16, gradient checkpointing, 16-mixed, batch 8) with
   its time and ``torch.cuda.max_memory_allocated`` (``bench_llama_lora.config_step``).

Each part is guarded: a failure is recorded with its traceback's last line and the run goes on. A time
budget (``--budget``, 450 s) skips what no longer fits, with a note, and stops a part that overruns it.
Everything goes to one markdown file (``--out``; by default ``$OUT/gpu-check.md`` when ``OUT`` is set,
else ``runs/gpu-check/gpu-check.md``), written to a temporary file and then renamed. The exit status is 1
when a part failed.

Without CUDA the same run is a CPU dry run: the tests on the CPU, the benchmark parts at tiny sizes (the
``small`` GPT-2 shape, small batches, a tiny LLaMA, ``torch.compile`` with the ``eager`` backend), and the
file says that its figures are not GPU figures.

Run, from the repository root (clipcap need not be installed):
    python -m benchmarks.gpu_check [--device auto|cuda|cpu] [--out FILE] [--budget 450]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import importlib
import importlib.abc
import importlib.metadata
import importlib.util
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
REFUSED = ("pycocoevalcap",)
BUDGET_S = 450.0
"""The whole run's time budget: with interpreter start-up it stays under the issue's 8 minutes."""
CLIPCAP_MODULES = (
    "clipcap.captioner",
    "clipcap.objectives",
    "clipcap.metrics",
    "clipcap.training",
    "clipcap.training.cli",
    "clipcap.lora",
    "clipcap.commands",
)
TEST_DEVICE_VARIABLE = "CLIPCAP_TEST_DEVICE"
CHILD_PYTEST = (
    "import sys; from benchmarks.gpu_check import refuse_imports; refuse_imports(); "
    "import pytest; sys.exit(pytest.main(sys.argv[1:]))"
)


@dataclass(frozen=True)
class Sizes:
    """What the benchmark parts run: the GPU figures, or a CPU dry run's tiny version of each.

    Attributes:
        shape: the GPT-2 shape (``bench_captioner.SHAPES``).
        train_batch, train_warmup, train_steps: cross-entropy batch, untimed and timed steps.
        images, new_tokens, generation_repeats: generation batch, tokens per caption, timed calls.
        step_batch, step_repeats: DiscriTune and GumbelClip batch and timed steps.
        llama: the LLaMA shape (``bench_llama_lora.SHAPES``) and ``llama_steps`` its timed steps.
        compile_backend: ``torch.compile``'s backend for the compiled decoding.
        tests_timeout: seconds the test process may take at most.
    """

    shape: str
    train_batch: int
    train_warmup: int
    train_steps: int
    images: int
    new_tokens: int
    generation_repeats: int
    step_batch: int
    step_repeats: int
    llama: str
    llama_steps: int
    compile_backend: str
    tests_timeout: float


GPU_SIZES = Sizes("gpt2-small", 128, 2, 5, 32, 40, 3, 100, 2, "7b", 3, "inductor", 200.0)
CPU_SIZES = Sizes("small", 8, 1, 1, 4, 16, 1, 8, 1, "tiny", 1, "eager", 200.0)
PART_NEEDS_S = {
    "tests": 30.0,
    "training": 20.0,
    "generation": 20.0,
    "steps": 30.0,
    "llama": 30.0,
    "compile": 60.0,
}
"""About how long each part needs on an H100: one that would start with less of the budget left is skipped."""


# ------------------------------------------------------------------------------------ refused imports


class RefusedImports(importlib.abc.MetaPathFinder):
    """An import hook that refuses ``names`` (and their submodules) and remembers who asked."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.attempts: list[str] = []

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname.split(".")[0] not in self.names:
            return None
        frames = [f for f in traceback.extract_stack()[:-1] if "importlib" not in f.filename]
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        self.attempts.append(f"{fullname} (from {where})")
        raise ImportError(
            f"{fullname} is refused in the GPU check: GPU machines cannot carry pycocoevalcap's 104 MB wheel, "
            "so nothing this run does may import it"
        )


def refuse_imports(names: tuple[str, ...] = REFUSED) -> RefusedImports:
    """Installs a :class:`RefusedImports` first on ``sys.meta_path``; a module already imported is refused
    too (a RuntimeError), since its import cannot be undone."""
    loaded = [name for name in sys.modules if name.split(".")[0] in names]
    if loaded:
        raise RuntimeError(f"already imported before the check started: {loaded}")
    finder = RefusedImports(names)
    sys.meta_path.insert(0, finder)
    return finder


# ------------------------------------------------------------------------------------------- the run


class BudgetSpent(Exception):
    """The run's time budget ran out in the middle of a part."""


@dataclass
class Part:
    """One section of the file: its outcome and its markdown lines."""

    title: str
    status: str = "not run"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def attempt(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, or None with ``what``'s failure noted (the traceback's last line) and printed whole."""
        try:
            return fn()
        except BudgetSpent:
            raise
        except Exception as error:  # noqa: BLE001 - every failure is recorded and the run goes on
            traceback.print_exc()
            self.status = "failed"
            self.notes.append(f"{what}: failed: {last_line(error)}")
            return None


def last_line(error: BaseException) -> str:
    return traceback.format_exception_only(type(error), error)[-1].strip()


class Run:
    """The parts run so far, the time budget and the scratch folder."""

    def __init__(self, device: torch.device, sizes: Sizes, budget: float, scratch: Path) -> None:
        self.device = device
        self.sizes = sizes
        self.budget = budget
        self.scratch = scratch
        self.started = time.perf_counter()
        self.parts: dict[str, Part] = {}
        self._gpt2: tuple[Path, int] | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.started)

    def part(self, key: str, title: str, body: Callable[[Part], None], needs: float = 0.0) -> Part:
        """Runs ``body`` as one guarded part, or skips it when less than ``needs`` seconds are left."""
        part = self.parts[key] = Part(title)
        left = self.left()
        if left < needs:
            part.status = "skipped"
            part.notes.append(
                f"the time budget is spent: {left:.0f} s left, this part needs about {needs:.0f} s"
            )
            return part
        print(f"== {title} ({left:.0f} s of the budget left)", flush=True)
        started = time.perf_counter()
        part.status = "ok"
        try:
            with deadline(left):
                body(part)
        except BudgetSpent:
            part.status = "stopped"
            part.notes.append(
                f"stopped when the time budget ran out, after {time.perf_counter() - started:.0f} s"
            )
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            part.status = "failed"
            part.notes.append(f"failed: {last_line(error)}")
        finally:
            part.seconds = time.perf_counter() - started
            release(self.device)
        print(f"== {title}: {part.status} in {part.seconds:.0f} s", flush=True)
        return part

    def gpt2(self) -> tuple[Path, int]:
        """The random GPT-2 of ``sizes.shape``, saved once: ``(folder, LM parameters)``."""
        if self._gpt2 is None:
            from benchmarks.bench_captioner import SHAPES, save_random_gpt2

            folder = self.scratch / "gpt2"
            self._gpt2 = folder, save_random_gpt2(SHAPES[self.sizes.shape], folder)
        return self._gpt2


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raises :class:`BudgetSpent` in the block after ``seconds`` (SIGALRM; a no-op off the main thread)."""
    if seconds <= 0:
        raise BudgetSpent
    try:
        previous = signal.signal(signal.SIGALRM, _alarm)
    except ValueError:  # not the main thread
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _alarm(signum: int, frame: Any) -> None:
    raise BudgetSpent


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast, as ``trainer.precision=bf16-mixed`` runs a step."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def figure(value: float) -> str:
    from benchmarks.bench_captioner import figure as three_digits

    return three_digits(value)


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "|".join("---" if i == 0 else "---:" for i in range(len(header)))
    return ["| " + " | ".join(header) + " |", f"|{align}|", *("| " + " | ".join(row) + " |" for row in rows)]


# ----------------------------------------------------------------------------------------- 1. imports


def import_names(distribution: str) -> list[str]:
    """The top-level modules a distribution provides: its name, but for the two whose modules differ."""
    known = {"openai-clip": ["clip"], "pillow": ["PIL"]}
    return known.get(distribution.lower(), [distribution.replace("-", "_").lower()])


def check_imports(part: Part) -> None:
    """Each runtime requirement: installed version against its range; then clipcap's modules import."""
    from benchmarks.gpu_wheels import canonical, runtime_requirements, split_requirement

    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:  # pragma: no cover - packaging comes with lightning and transformers
        SpecifierSet = None  # noqa: N806
    rows, missing = [], []
    for requirement in runtime_requirements():
        name, extras, specifier = split_requirement(requirement)
        if canonical(name) in REFUSED:
            rows.append(
                [f"`{requirement}`", "—", "not needed here: the NLG metrics only; refused for this run"]
            )
            continue
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = None
        # find_spec, not import: openai-clip's own package imports torchvision (clipcap only reads its file).
        found = all(importlib.util.find_spec(module) is not None for module in import_names(name))
        if version is None or not found:
            missing.append(name)
            rows.append([f"`{requirement}`", "—", "**missing**"])
            continue
        status = "ok"
        if SpecifierSet is not None and specifier and version not in SpecifierSet(specifier):
            status = f"**{version} is outside {specifier}**"
            missing.append(name)
        for extra in sorted(extras):
            absent = extra_requirements_missing(name, extra)
            if absent:
                status = f"**[{extra}] needs {', '.join(absent)}**"
                missing.extend(absent)
        rows.append([f"`{requirement}`", version, status])
    part.lines += table(["requirement", "installed", "status"], rows, "---|---|---")
    failed = []
    for module in CLIPCAP_MODULES:
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001
            failed.append(f"`{module}`: {last_line(error)}")
    part.lines += [
        "",
        "clipcap's modules: "
        + (
            "; ".join(failed)
            if failed
            else "all import (" + ", ".join(f"`{m}`" for m in CLIPCAP_MODULES) + ")."
        ),
    ]
    if missing or failed:
        part.status = "failed"
        part.notes.append(
            f"missing or too old: {', '.join(missing) or 'none'}; modules that do not import: {len(failed)}"
        )


def extra_requirements_missing(name: str, extra: str) -> list[str]:
    """The requirements ``name[extra]`` adds that are not installed (read from ``name``'s metadata)."""
    from packaging.requirements import Requirement

    absent = []
    for text in importlib.metadata.requires(name) or []:
        requirement = Requirement(text)
        if requirement.marker is None or not requirement.marker.evaluate({"extra": extra}):
            continue
        if requirement.marker.evaluate({"extra": ""}):
            continue  # not the extra's own
        try:
            importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            absent.append(requirement.name)
    return absent


# ------------------------------------------------------------------------------------------- 2. tests


def run_tests(part: Part, run: Run) -> None:
    """``pytest -m gpu tests/test_gpu.py`` on this device in a child process that refuses pycocoevalcap."""
    report = run.scratch / "tests.xml"
    arguments = ["-m", "gpu", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider", "-rfEs"]
    arguments += ["--junitxml", str(report), "--basetemp", str(run.scratch / "pytest")]
    command = [sys.executable, "-c", CHILD_PYTEST, *arguments]
    environment = {**os.environ, TEST_DEVICE_VARIABLE: run.device.type}
    timeout = max(10.0, min(run.sizes.tests_timeout, run.left() - 60.0))
    shown = f"{TEST_DEVICE_VARIABLE}={run.device.type} python -m pytest " + shlex.join(arguments[:3])
    part.lines += [f"- Command: `{shown}` (pycocoevalcap refused), at most {timeout:.0f} s"]
    try:
        done = subprocess.run(
            command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as expired:
        part.status = "failed"
        part.notes.append(f"the tests did not finish within {timeout:.0f} s")
        output = expired.stdout or b""
        sys.stdout.write(output.decode(errors="replace") if isinstance(output, bytes) else output)
        return
    sys.stdout.write(done.stdout[-20000:])
    sys.stderr.write(done.stderr[-5000:])
    summary = next(
        (line.strip("= ") for line in reversed(done.stdout.splitlines()) if " in " in line and line.strip()),
        "",
    )
    part.lines += [f"- Result: {summary or 'no summary line'} (exit status {done.returncode})", ""]
    if report.is_file():
        part.lines += table(["test", "outcome", "s", "message"], junit_rows(report), "---|---|---:|---")
    if done.returncode != 0:
        part.status = "failed"
        part.notes.append(f"pytest exited with {done.returncode}: {summary}")


def junit_rows(report: Path) -> list[list[str]]:
    """One row per test case of a JUnit XML report: name, outcome, seconds, the failure's message."""
    rows = []
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "**failed**", "error": "**error**", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "").splitlines()[0][:200] if child.get("message") else ""
        name = case.get("name", "?").replace("|", "/")
        rows.append([f"`{name}`", outcome, f"{float(case.get('time', 0)):.1f}", message.replace("|", "/")])
    return rows


# ---------------------------------------------------------------------------------------- 3. training


def bench_cross_entropy(part: Part, run: Run) -> None:
    """Cross-entropy samples/s in bf16 autocast for both suite settings, and model FLOPs utilisation."""
    import benchmarks.bench_captioner as captioner_bench
    from benchmarks.model_flops import FORMULA, bf16_dense_peak, setting_flops

    sizes, device = run.sizes, run.device
    shape = captioner_bench.SHAPES[sizes.shape]
    folder, parameters = run.gpt2()
    plan = captioner_bench.Plan(sizes.train_warmup, sizes.train_steps, sizes.generation_repeats, 1)
    peak = bf16_dense_peak(torch.cuda.get_device_name(device)) if run.cuda else None
    rows = []
    for setting, mapper, trainable in captioner_bench.training_settings():
        rate = part.attempt(
            setting,
            lambda mapper=mapper, trainable=trainable: captioner_bench.bench_training(
                folder, mapper, trainable, device, "bfloat16", plan, batch_size=sizes.train_batch
            ),
        )
        flops = setting_flops(
            shape.n_layer,
            shape.n_embd,
            shape.vocab_size,
            mapper,
            trainable,
            captioner_bench.CAPTION_TOKENS,
            captioner_bench.CLIP_DIM,
        )
        achieved = None if rate is None else rate * flops.total
        utilisation = "—" if achieved is None or peak is None else f"{100 * achieved / peak[1]:.1f} %"
        rows.append([
            setting,
            str(sizes.train_batch),
            "failed" if rate is None else figure(rate),
            f"{flops.total / 1e9:.2f}",
            "—" if achieved is None else f"{achieved / 1e12:.2f}",
            utilisation,
        ])  # fmt: skip
        print(f"training, {setting}: {rows[-1]}", flush=True)
    part.lines += table(
        ["setting", "batch", "samples/s", "GFLOP/sample", "model TFLOP/s", "MFU"],
        rows,
        "---|---:|---:|---:|---:|---:",
    )
    part.lines += [
        "",
        f"- {sizes.shape} GPT-2 shape ({shape.n_layer} layers × {shape.n_embd}, {shape.n_head} heads, "
        f"{shape.vocab_size} ids, {parameters / 1e6:.1f} M LM parameters), random weights; prefix "
        f"{captioner_bench.PREFIX_LENGTH}, captions of exactly {captioner_bench.CAPTION_TOKENS} tokens, "
        f"{captioner_bench.CLIP_DIM}-d random CLIP features; bf16 autocast over float32 weights (as bf16-mixed); "
        "tokenize, forward, backward, fused AdamW step, zero grads (`bench_captioner.bench_training`); median of "
        f"{sizes.train_steps} step(s) after {sizes.train_warmup} warm-up step(s).",
        f"- Model FLOPs (`benchmarks.model_flops`): {FORMULA}; with S = "
        f"{captioner_bench.PREFIX_LENGTH + captioner_bench.CAPTION_TOKENS - 1}, K = {captioner_bench.CAPTION_TOKENS}.",
        "- MFU = samples/s × FLOPs per sample / the device's bf16 dense peak: "
        + (
            f"{peak[0]}, {peak[1] / 1e12:.0f} TFLOP/s."
            if peak
            else "no peak known for this device (none on a CPU)."
        ),
    ]


# -------------------------------------------------------------------------------------- 4. generation

CACHES = {
    "generate_ids": "`ClipCaptioner.generate_ids` as shipped (its own cache, the prefix shared by beams)",
    "DynamicCache": "transformers' `DynamicCache` (generate's default), no compile",
    "StaticCache": 'transformers\' `StaticCache` (`cache_implementation="static"`), no compile',
    "StaticCache + torch.compile": "the static cache with transformers' `torch.compile` of the decoding forward",
}


def decode_ids(
    captioner: Any, features: torch.Tensor, decoding: Any, cache: str, compile_backend: str
) -> list[list[int]]:
    """Caption ids decoded with the cache ``cache`` (a key of :data:`CACHES`).

    ``generate_ids`` decodes as shipped; the others call the LM's ``generate`` with the settings
    ``ClipCaptioner._generate`` gives it (``DecodingConfig.generation_config``, the prefix as
    ``inputs_embeds``) but without a cache of clipcap's, which generate refuses beside a
    ``cache_implementation``: each beam then runs the prefix itself.
    """
    from transformers import CompileConfig

    from clipcap.generation import cut_at_stop

    if cache == "generate_ids":
        return captioner.generate_ids(features, decoding)
    stops = captioner.stop_ids(decoding)
    config = decoding.generation_config(stops, captioner.lm.pad_token_id)
    if cache.startswith("StaticCache"):
        config.cache_implementation = "static"
    compiled = cache.endswith("torch.compile")
    config.disable_compile = not compiled
    if compiled:
        on_cuda = features.device.type == "cuda"
        config.compile_config = CompileConfig(
            backend=compile_backend, mode="reduce-overhead" if on_cuda else None
        )
        # transformers compiles on accelerators only; its own switch for other devices, for this dry run.
        config.compile_config._compile_all_devices = not on_cuda
    with torch.no_grad():
        prefix = captioner.prefix(features)
        attention_mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        ids = captioner.lm.model.generate(
            inputs_embeds=prefix, attention_mask=attention_mask, generation_config=config
        )
    return cut_at_stop(ids, captioner.lm.eos_token_id, stops)


def bench_decoding(part: Part, run: Run, caches: tuple[str, ...]) -> None:
    """Greedy and beam-5 captions/s with each of ``caches`` (bf16 LM weights, fp32 mapper)."""
    from benchmarks.bench_captioner import BEAMS, CLIP_DIM, PREFIX_LENGTH, timed
    from clipcap.captioner import ClipCaptioner
    from clipcap.generation import DecodingConfig
    from clipcap.lm import PrefixLM
    from clipcap.mapper import MLPMapper

    sizes, device = run.sizes, run.device
    folder, _ = run.gpt2()
    torch.manual_seed(0)
    lm = PrefixLM(str(folder), trainable=False, dtype="bfloat16")
    captioner = ClipCaptioner(
        lm, functools.partial(MLPMapper, prefix_length=PREFIX_LENGTH), clip_dim=CLIP_DIM
    )
    captioner = captioner.to(device).eval()
    features = torch.randn(sizes.images, CLIP_DIM, generator=torch.Generator().manual_seed(0)).to(device)
    graphs_before = dynamo_graphs()
    rows = []
    for beams in (1, BEAMS):
        decoding = DecodingConfig(num_beams=beams, max_new_tokens=sizes.new_tokens, ignore_stops=True)
        reference = None
        for cache in caches:
            warmups = 2 if cache.endswith("torch.compile") else 1  # CUDA graphs record on the second call
            decode = functools.partial(
                decode_ids, captioner, features, decoding, cache, sizes.compile_backend
            )
            outputs: list[list[list[int]]] = []

            def measure(decode=decode, outputs=outputs, warmups=warmups) -> float:
                seconds = timed(lambda: outputs.append(decode()), warmups, sizes.generation_repeats, device)
                lengths = {len(ids) for ids in outputs[-1]}
                if len(outputs[-1]) != sizes.images or lengths != {sizes.new_tokens}:
                    raise RuntimeError(f"{len(outputs[-1])} captions of lengths {sorted(lengths)}")
                return sizes.images / statistics.median(seconds)

            label = "greedy" if beams == 1 else f"beam {beams}"
            rate = part.attempt(f"{label}, {cache}", measure)
            if cache == "generate_ids" and outputs:
                reference = outputs[-1]
            same = (
                f"{sum(a == b for a, b in zip(outputs[-1], reference, strict=True))}/{sizes.images}"
                if rate is not None and reference is not None
                else "—"
            )
            rows.append([label, cache, "failed" if rate is None else figure(rate), same])
            print(f"generation: {rows[-1]}", flush=True)
            release(device)
    part.lines += table(
        ["decoder", "KV cache", "captions/s", "ids equal to generate_ids'"], rows, "---|---|---:|---:"
    )
    part.lines += [
        "",
        f"- {sizes.images} images, exactly {sizes.new_tokens} new tokens each (`ignore_stops`, lengths checked), "
        f"{sizes.shape} GPT-2 shape with random bf16 weights, float32 MLP mapper (prefix {PREFIX_LENGTH}); median of "
        f"{sizes.generation_repeats} call(s) after one warm-up call of the full length (two when compiled).",
        *(f"- {cache}: {CACHES[cache]}." for cache in caches),
    ]
    if "StaticCache + torch.compile" in caches:
        graphs = dynamo_graphs() - graphs_before
        part.lines.append(
            f"- Compiled: backend `{sizes.compile_backend}`"
            + (", mode `reduce-overhead` (CUDA graphs)" if run.cuda else " (a CPU dry run: no speed figure)")
            + f"; {graphs} graph(s) compiled, in the warm-up calls, not in the figure."
        )
        if graphs == 0:
            part.status = "failed"
            part.notes.append("torch.compile compiled nothing: the compiled rows ran eagerly")


def dynamo_graphs() -> int:
    """Graphs ``torch.compile`` has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ------------------------------------------------------------------------------------------- 5. steps


def bench_steps(part: Part, run: Run) -> None:
    """One DiscriTune and one GumbelClip step in bf16 autocast at ``step_batch``, split by part."""
    from benchmarks.bench_discritune import CAPTION_TOKENS as DISCRITUNE_TOKENS
    from benchmarks.bench_discritune import PARTS as DISCRITUNE_PARTS
    from benchmarks.bench_discritune import bench_shape
    from benchmarks.bench_suite import GUMBEL_PARTS, ROLLOUT_TOKENS, bench_gumbel_clip, gumbel_clip_setup

    sizes, device = run.sizes, run.device
    rows = []

    def discritune() -> dict[str, float]:
        with autocast(device):
            return bench_shape(sizes.shape, sizes.step_batch, sizes.step_repeats, device)

    def gumbel() -> dict[str, float]:
        captioner, objective = gumbel_clip_setup(sizes.shape, device)
        with autocast(device):
            return bench_gumbel_clip(captioner, objective, sizes.step_batch, sizes.step_repeats, device)

    for name, measure, names, rollout in (
        ("DiscriTune", discritune, DISCRITUNE_PARTS, f"greedy rollout of {DISCRITUNE_TOKENS} tokens"),
        ("GumbelClip", gumbel, GUMBEL_PARTS, f"Gumbel rollout of {ROLLOUT_TOKENS} steps"),
    ):
        parts = part.attempt(name, measure)
        release(device)
        split = (
            "failed" if parts is None else ", ".join(f"{p} {figure(parts[p])} s" for p in names if p in parts)
        )
        rows.append(
            [
                name,
                str(sizes.step_batch),
                rollout,
                "failed" if parts is None else figure(parts["step"]),
                split,
            ]
        )
        print(f"steps: {rows[-1]}", flush=True)
    part.lines += table(["objective", "batch", "rollout", "s/step", "by part"], rows, "---|---:|---|---:|---")
    part.lines += [
        "",
        f"- {sizes.shape} GPT-2 shape, random weights, mapper and LM trained, fused Adam; a receiver CLIP of the "
        "ViT-B/32 shape (random); bf16 autocast around the whole step (forward as bf16-mixed; backward follows the "
        f"forward's dtypes); one warm-up step, then the median of {sizes.step_repeats} step(s) "
        "(`bench_discritune.bench_shape`, `bench_suite.bench_gumbel_clip`).",
    ]


# ------------------------------------------------------------------------------------------- 6. llama


def bench_llama(part: Part, run: Run) -> None:
    """The LLaMA LoRA cross-entropy step in the V100 config's settings: time and peak memory."""
    from benchmarks.bench_llama_lora import config_step, gib
    from benchmarks.memory_estimate import CARD_BUDGETS

    result = config_step(run.sizes.llama, run.device, run.sizes.llama_steps)
    trial, unit = result.trial, result.unit
    budget = CARD_BUDGETS["16 GB"]
    if not trial.fits:
        measured, seconds, fits = "out of memory", "—", "no"
    else:
        measured, seconds = gib(trial.peak, unit), f"{figure(trial.seconds)} s"
        fits = "—" if trial.peak is None else ("yes" if trial.peak <= budget else "no")
    part.lines += table(
        ["batch", "s/step", f"peak ({unit})", f"estimate ({unit})", "fits a 16 GB V100 (≤ 15 GiB)"],
        [[str(result.batch), seconds, measured, gib(result.estimate, unit), fits]],
        "---:|---:|---:|---:|---",
    )
    part.lines += [
        "",
        f"- {result.settings}.",
        "- Peak: `torch.cuda.max_memory_allocated` over the timed steps after one warm-up step (tensors only; the "
        "CUDA context and the allocator's reserve are not counted); — on a CPU. Estimate: "
        "`benchmarks.memory_estimate.estimate_lora_memory` for the same setting.",
    ]
    if trial.fits and trial.peak is not None and trial.peak > budget:
        part.notes.append(f"the peak {gib(trial.peak)} GiB is over the 16 GB V100's 15 GiB")


# ---------------------------------------------------------------------------------------- the file


def versions() -> str:
    found = []
    for name in ("torch", "transformers", "lightning", "peft", "torchmetrics"):
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} missing")
    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ""
    return ", ".join(found) + f", Python {platform.python_version()}{cuda}"


def device_line(device: torch.device) -> str:
    from benchmarks.model_flops import bf16_dense_peak

    if device.type != "cuda":
        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
    name = torch.cuda.get_device_name(device)
    memory = torch.cuda.get_device_properties(device).total_memory / 2**30
    peak = bf16_dense_peak(name)
    known = (
        f"bf16 dense peak {peak[1] / 1e12:.0f} TFLOP/s ({peak[0]})" if peak else "bf16 peak not in the table"
    )
    return f"{name}, {memory:.0f} GiB, {known}"


def render(run: Run, command: str, date: str, refused: RefusedImports) -> str:
    lines = ["# clipcap GPU check", ""]
    if not run.cuda:
        lines += [
            "**CPU dry run: no CUDA device, so these are not GPU figures.** The same script ran its tests on the CPU "
            "and its benchmark parts at tiny sizes, to exercise every code path before a GPU run.",
            "",
        ]
    elapsed = time.perf_counter() - run.started
    lines += [
        f"- Command: `{command}`",
        f"- Date (UTC): {date}",
        f"- Device: {device_line(run.device)}",
        f"- Versions: {versions()}",
        f"- Run time: {elapsed:.0f} s of a {run.budget:.0f} s budget",
        "- pycocoevalcap: refused for the whole run; import attempts: "
        + ("; ".join(refused.attempts) if refused.attempts else "none")
        + (" (**and it is in sys.modules**)" if any(n in sys.modules for n in REFUSED) else ""),
        "",
    ]
    lines += table(
        ["part", "status", "s", "notes"],
        [
            [p.title, p.status, f"{p.seconds:.0f}", "; ".join(p.notes).replace("|", "/")]
            for p in run.parts.values()
        ],
        "---|---|---:|---",
    )
    for number, part in enumerate(run.parts.values(), start=1):
        lines += [
            "",
            f"## {number}. {part.title}",
            "",
            f"Status: {part.status}" + (f" ({part.seconds:.0f} s)" if part.seconds else ""),
        ]
        lines += [f"- {note}" for note in part.notes]
        if part.lines:
            lines += ["", *part.lines]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
    os.replace(handle.name, path)


def default_out() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "gpu-check.md" if out else REPO / "runs" / "gpu-check" / "gpu-check.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument(
        "--out", type=Path, default=None, help="the markdown file (default: $OUT/gpu-check.md)"
    )
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run")
    args = parser.parse_args(argv)
    refused = refuse_imports()
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(variable, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    sizes = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    out = args.out or default_out()
    command = shlex.join(["python", "-m", "benchmarks.gpu_check", *(sys.argv[1:] if argv is None else argv)])
    date = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}"

    with tempfile.TemporaryDirectory(prefix="clipcap-gpu-check-") as scratch:
        run = Run(device, sizes, args.budget, Path(scratch))
        run.part("imports", "Imports and dependencies", check_imports)
        with contextlib.suppress(Exception):
            from benchmarks.bench_captioner import quiet_libraries

            quiet_libraries()
        run.part("tests", "Tests: pytest -m gpu", lambda part: run_tests(part, run), PART_NEEDS_S["tests"])
        run.part(
            "training",
            f"Cross-entropy training, bf16, batch {sizes.train_batch}",
            lambda part: bench_cross_entropy(part, run),
            PART_NEEDS_S["training"],
        )
        run.part(
            "generation",
            f"Generation, bf16, batch {sizes.images}, {sizes.new_tokens} tokens",
            lambda part: bench_decoding(part, run, ("generate_ids", "DynamicCache", "StaticCache")),
            PART_NEEDS_S["generation"],
        )
        run.part(
            "steps",
            f"DiscriTune and GumbelClip steps, bf16, batch {sizes.step_batch}",
            lambda part: bench_steps(part, run),
            PART_NEEDS_S["steps"],
        )
        run.part(
            "llama",
            "LLaMA-2-7B LoRA step, V100 config" if run.cuda else "LLaMA LoRA step (tiny LLaMA), V100 config",
            lambda part: bench_llama(part, run),
            PART_NEEDS_S["llama"],
        )
        run.part(
            "compile",
            "Generation, static cache + torch.compile",
            lambda part: bench_decoding(part, run, ("generate_ids", "StaticCache + torch.compile")),
            PART_NEEDS_S["compile"],
        )
        write_atomically(out, render(run, command, date, refused))
    print(f"wrote {out}")
    failed = [part.title for part in run.parts.values() if part.status == "failed"]
    if failed or any(name in sys.modules for name in REFUSED):
        print(f"failed: {', '.join(failed) or 'pycocoevalcap was imported'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
