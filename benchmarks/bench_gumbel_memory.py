"""Gumbel-softmax rollout memory benchmark: peak memory with and without per-step activation checkpointing.

For a GPT-2-shaped LM with random weights (``--shape gpt2-small``: 12 layers, width 768, 12 heads, 50257
ids; ``--shape small``: 4 layers, width 256, 8192 ids, a quick run), trained, behind an MLP mapper (prefix
10, 512-d CLIP features), in training mode (dropout on), one measured step is:

1. ``gumbel_rollout``: straight-through hard samples, exactly ``--tokens`` steps (a stop would have to be
   sampled by all ``--batch`` rows at once to end it early), KV cache on;
2. backward of ``(weights @ R).sum()``, R a fixed random (V, 16) matrix.

Each setting (``checkpoint_steps`` off, on) runs in a fresh Python process, so that nothing one leaves
in the allocator or the page tables counts against the other. How memory is measured:

- CPU: the process's resident set (RSS) from ``/proc/self/status``. After the model is built and a small
  warm-up rollout has initialised the libraries, the peak (``VmHWM``) is reset to the current RSS by
  writing 5 to ``/proc/self/clear_refs`` (Linux ≥ 4.0); the figures are ``VmHWM`` (and ``VmRSS`` after
  the rollout) minus the RSS just before the step. The worker runs with ``MALLOC_MMAP_THRESHOLD_=131072``,
  a fixed glibc threshold: every tensor above 128 KiB is its own mapping, returned to the system when
  freed, so RSS follows the live tensors instead of glibc's heap high-water mark. Where ``clear_refs``
  cannot be written, the peak ``ru_maxrss`` (``getrusage``) since process start is used instead, a lower
  bound (the table says which).
- CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the step, after
  ``reset_peak_memory_stats`` (tensors only; the caching allocator's reserve is not counted).

The parameters' gradients (allocated in backward; the same for both settings) are part of the peak and
given separately.

Run:
    .venv/bin/python -m benchmarks.bench_gumbel_memory [--shape gpt2-small|small] [--batch 32]
        [--tokens 20] [--threads 2] [--device cpu|cuda] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

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
from clipcap.gumbel import GumbelRollout, gumbel_rollout
from clipcap.lm import PrefixLM
from clipcap.mapper import MLPMapper

CLIP_DIM = 512
PREFIX_LENGTH = 10
PROJECTION_WIDTH = 16
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
MiB = 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class CpuMemory:
    """Resident-set peaks of this process, in bytes, relative to a baseline taken by ``start``."""

    def __init__(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "RSS peak (VmHWM reset via clear_refs)"
            self.resettable = True
        except OSError:
            self.method = "ru_maxrss since start (lower bound: peak not resettable)"
            self.resettable = False

    def _current(self) -> int:
        if self.resettable:
            return _status_kib("VmRSS") * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _peak(self) -> int:
        if self.resettable:
            return _status_kib("VmHWM") * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def start(self) -> None:
        gc.collect()
        if self.resettable:
            Path("/proc/self/clear_refs").write_text("5")
        self.base = self._current()

    def held(self) -> int:
        return self._current() - self.base

    def peak(self) -> int:
        return self._peak() - self.base


class CudaMemory:
    """Allocated-tensor peaks on the current CUDA device, in bytes, relative to ``start``."""

    method = "torch.cuda.max_memory_allocated"

    def start(self) -> None:
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()

    def held(self) -> int:
        return torch.cuda.memory_allocated() - self.base

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() - self.base


def worker(shape_name: str, batch: int, tokens: int, checkpoint_steps: bool, device: torch.device) -> dict:
    """Measures one setting in this process; returns bytes and seconds."""
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="clipcap-bench-") as folder:
        save_random_gpt2(SHAPES[shape_name], Path(folder))
        torch.manual_seed(0)
        captioner = ClipCaptioner(
            PrefixLM(folder, trainable=True),
            functools.partial(MLPMapper, prefix_length=PREFIX_LENGTH),
            clip_dim=CLIP_DIM,
        ).to(device)
    captioner.train()
    vocab = captioner.lm.model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator(device=device).manual_seed(0)
    features = torch.randn(batch, CLIP_DIM, device=device, generator=generator)
    projection = torch.randn(vocab, PROJECTION_WIDTH, device=device, generator=generator)
    options = GumbelRollout(max_new_tokens=tokens, checkpoint_steps=checkpoint_steps)

    memory = CudaMemory() if device.type == "cuda" else CpuMemory()

    def step(rows: int, options: GumbelRollout) -> tuple[float, float, int, int, int]:
        """Rollout and backward: (rollout s, backward s, steps run, bytes held after the rollout, peak)."""
        started = time.perf_counter()
        caption = gumbel_rollout(captioner, features[:rows], options, generator=generator)
        synchronize(device)
        rolled = time.perf_counter()
        held = memory.held()
        forward_peak = memory.peak()
        (caption.weights @ projection).sum().backward()
        synchronize(device)
        return rolled - started, time.perf_counter() - rolled, caption.weights.shape[1], held, forward_peak

    # Warm-up: a small rollout initialises the libraries' pools and kernels.
    memory.start()
    step(2, GumbelRollout(max_new_tokens=2, checkpoint_steps=checkpoint_steps))
    captioner.zero_grad(set_to_none=True)

    memory.start()
    rollout_s, backward_s, steps, held, forward_peak = step(batch, options)
    total_peak = memory.peak()
    grad_bytes = sum(
        p.grad.numel() * p.grad.element_size() for p in captioner.parameters() if p.grad is not None
    )
    return {
        "steps": steps,
        "held": held,
        "forward_peak": forward_peak,
        "total_peak": total_peak,
        "grad_bytes": grad_bytes,
        "rollout_s": rollout_s,
        "backward_s": backward_s,
        "method": memory.method,
        "parameters": sum(p.numel() for p in captioner.parameters()),
    }


def run_worker(args: argparse.Namespace, checkpoint_steps: bool) -> dict:
    """Runs ``worker`` in a fresh Python process and returns its result."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        f"--shape={args.shape}",
        f"--batch={args.batch}",
        f"--tokens={args.tokens}",
        f"--threads={args.threads}",
        f"--device={args.device}",
    ] + (["--checkpoint-steps"] if checkpoint_steps else [])
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": str(args.threads)}
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"worker {shlex.join(command)} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def mib(value: int) -> str:
    return f"{figure(value / MiB)} MiB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="gpt2-small", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=20, help="rollout steps (L)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--write", type=Path, default=None, help="write the block into this markdown file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint-steps", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.worker:
        result = worker(args.shape, args.batch, args.tokens, args.checkpoint_steps, device)
        print(json.dumps(result))
        return

    load_before = load_average()
    lines = [
        "| shape | checkpoint_steps | steps | held after rollout | peak, rollout | peak, rollout + backward "
        "| rollout | backward |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    results = {}
    for checkpoint_steps in (False, True):
        result = run_worker(args, checkpoint_steps)
        results[checkpoint_steps] = result
        lines.append(
            f"| {args.shape} | {'on' if checkpoint_steps else 'off'} | {result['steps']} | {mib(result['held'])} "
            f"| {mib(result['forward_peak'])} | {mib(result['total_peak'])} "
            f"| {figure(result['rollout_s'])} s | {figure(result['backward_s'])} s |"
        )
        print(lines[-1], flush=True)
    off, on = results[False], results[True]
    python = os.path.relpath(sys.executable)
    python = sys.executable if python.startswith("..") else python
    command = shlex.join(
        [python, "-m", "benchmarks.bench_gumbel_memory", *(sys.argv[1:] if argv is None else argv)]
    )
    block = "\n".join(
        [
            f"### Gumbel-softmax rollout memory, {args.shape}, {args.device}, batch {args.batch}, L {args.tokens}",
            "",
            *run_lines(command, machine_description(device, "float32", args.threads), load_before),
            f"- Measured: {off['method']}, each setting in a fresh process, relative to the memory just "
            "before the step (model and inputs in memory, no optimizer); straight-through hard samples, KV "
            f"cache, LM and mapper trained ({off['parameters'] / 1e6:.0f} M parameters), training mode",
            f"- The peaks include the parameters' gradients, {mib(off['grad_bytes'])}, allocated in backward",
            f"- Checkpointing: held memory × {on['held'] / max(off['held'], 1):.2f}, peak × "
            f"{on['total_peak'] / max(off['total_peak'], 1):.2f}, step time × "
            f"{(on['rollout_s'] + on['backward_s']) / (off['rollout_s'] + off['backward_s']):.2f}"
            + (
                " (CPU times are under the fixed malloc threshold, which slows allocation: compare the two "
                "rows, not other tables)"
                if device.type == "cpu"
                else ""
            ),
            "",
            *lines,
        ]
    )
    print()
    print(block)
    if args.write:
        write_markdown(args.write, f"gumbel-memory-{args.device}-{args.shape}", block)


if __name__ == "__main__":
    main()
