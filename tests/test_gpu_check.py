"""``make gpu-check`` prepared on the CPU: its dry run end to end, and the pieces its figures rest on (the
FLOP count, the peak table, the decoding caches, the refused import, the time budget, the wheel list)."""

from __future__ import annotations

import functools
import importlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import gpu_check
from benchmarks.bench_captioner import SHAPES, save_random_gpt2, training_captions, training_settings
from benchmarks.gpu_wheels import missing_on_gpu_machines
from benchmarks.model_flops import bf16_dense_peak, cross_entropy_flops
from clipcap.captioner import ClipCaptioner
from clipcap.data.batch import CaptionBatch
from clipcap.generation import DecodingConfig
from clipcap.lm import PrefixLM
from clipcap.mapper import MLPMapper
from clipcap.objectives import CrossEntropy

REPO = Path(__file__).resolve().parents[1]
SECTIONS = (
    "## 1. Imports and dependencies",
    "## 2. Tests: pytest -m gpu",
    "## 3. Cross-entropy training, bf16",
    "## 4. Generation, bf16",
    "## 5. DiscriTune and GumbelClip steps, bf16",
    "## 6. LLaMA LoRA step (tiny LLaMA), V100 config",
    "## 7. Generation, static cache + torch.compile",
)


def test_the_cpu_dry_run_writes_one_file_with_every_section(tmp_path: Path) -> None:
    """``python -m benchmarks.gpu_check`` without CUDA: every part runs at tiny sizes, the gpu tests pass on
    the CPU, nothing imports pycocoevalcap, and the one file says it holds no GPU figures."""
    out = tmp_path / "check" / "gpu-check.md"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text()
    assert "**CPU dry run: no CUDA device, so these are not GPU figures.**" in text
    for section in SECTIONS:
        assert section in text
    assert text.count("Status: ok") == len(SECTIONS), text
    assert "pycocoevalcap: refused for the whole run; import attempts: none" in text
    assert "| `test_every_objective_fits_in_bf16_mixed[gumbel_clip]` | passed |" in text
    assert "graph(s) compiled" in text and " 0 graph(s) compiled" not in text
    assert not list(out.parent.glob(".gpu-check.md.*"))  # the temporary file was renamed


@pytest.fixture(scope="module")
def small_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("small")
    save_random_gpt2(SHAPES["small"], folder)
    return folder


@pytest.mark.parametrize("setting", [name for name, _, _ in training_settings()])
def test_the_flop_count_is_what_the_step_runs(setting: str, small_gpt2: Path) -> None:
    """The formula's forward and backward FLOPs equal ``FlopCounterMode``'s count of a real cross-entropy
    step's matrix products (the LM in eager attention, whose products the counter sees; on a CPU it does
    not count the mapper's fused attention kernel, so that term is left out of the comparison)."""
    shape = SHAPES["small"]
    _, mapper, trainable = next(s for s in training_settings() if s[0] == setting)
    torch.manual_seed(0)
    captioner = ClipCaptioner(
        PrefixLM(str(small_gpt2), trainable=trainable), mapper, clip_dim=512, max_caption_tokens=20
    )
    captioner.lm.model.set_attn_implementation("eager")
    captioner.train()
    batch = CaptionBatch(
        image_ids=["0", "1"],
        clip_features=torch.randn(2, 512),
        captions=training_captions(captioner.tokenizer, 2),
    )
    with FlopCounterMode(display=False) as counter:
        loss = CrossEntropy()(captioner, batch).loss
        forward = counter.get_total_flops()
        loss.backward()
    backward = counter.get_total_flops() - forward
    options = mapper.keywords
    transformer = "num_layers" in options
    flops = cross_entropy_flops(
        shape.n_layer, shape.n_embd, shape.vocab_size, lm_trained=trainable,
        mapper="transformer" if transformer else "mlp", prefix_length=options["prefix_length"],
        **({"clip_length": options["clip_length"], "mapper_layers": options["num_layers"]} if transformer else {}),
    )  # fmt: skip
    uncounted = flops.parts.get("mapper_attention", (0.0, 0.0))
    assert forward / 2 == flops.forward - uncounted[0]
    assert backward / 2 == flops.backward - uncounted[1]


def test_the_bf16_peak_is_looked_up_from_the_device_name() -> None:
    assert bf16_dense_peak("NVIDIA H100 80GB HBM3") == ("H100 SXM", 989e12)
    assert bf16_dense_peak("NVIDIA H100 PCIe") == ("H100 PCIe", 756e12)
    assert bf16_dense_peak("NVIDIA H200") == ("H200", 989e12)
    assert bf16_dense_peak("NVIDIA A100-SXM4-80GB") == ("A100", 312e12)
    assert bf16_dense_peak("Tesla V100-SXM2-16GB") is None


@pytest.fixture(scope="module")
def captioner(gpt2_folder: Path) -> ClipCaptioner:
    torch.manual_seed(0)
    lm = PrefixLM(str(gpt2_folder))
    return ClipCaptioner(lm, functools.partial(MLPMapper, prefix_length=4), clip_dim=16).eval()


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("cache", ["DynamicCache", "StaticCache"])
def test_the_benchmarked_caches_decode_what_generate_ids_decodes(beams: int, cache: str, captioner) -> None:
    """The check's decoding rows time the same captions: with transformers' caches (no prefix shared among
    beams, no clipcap cache) greedy and beam search give ``generate_ids``' ids, in float32."""
    features = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    decoding = DecodingConfig(num_beams=beams, max_new_tokens=10, ignore_stops=True)
    expected = captioner.generate_ids(features, decoding)
    assert gpu_check.decode_ids(captioner, features, decoding, cache, "eager") == expected


def test_a_refused_import_raises_and_is_recorded() -> None:
    finder = gpu_check.RefusedImports(("clipcap_refused_probe",))
    sys.meta_path.insert(0, finder)
    try:
        with pytest.raises(ImportError, match="refused in the GPU check"):
            importlib.import_module("clipcap_refused_probe.sub")
    finally:
        sys.meta_path.remove(finder)
    assert finder.attempts and finder.attempts[0].startswith("clipcap_refused_probe")


def test_parts_fail_alone_and_the_budget_skips_or_stops_them(tmp_path: Path) -> None:
    run = gpu_check.Run(torch.device("cpu"), gpu_check.CPU_SIZES, budget=1.0, scratch=tmp_path)

    def broken(part: gpu_check.Part) -> None:
        part.attempt("one measurement", lambda: 1 / 0)
        raise ValueError("the part itself")

    failed = run.part("broken", "Broken", broken)
    assert failed.status == "failed"
    assert failed.notes == [
        "one measurement: failed: ZeroDivisionError: division by zero",
        "failed: ValueError: the part itself",
    ]
    stopped = run.part("slow", "Slow", lambda part: time.sleep(5))
    assert stopped.status == "stopped" and stopped.seconds < 2
    skipped = run.part("late", "Late", lambda part: None, needs=10.0)
    assert skipped.status == "skipped" and "time budget is spent" in skipped.notes[0]


def test_the_gpu_machines_lack_the_cli_and_clip_text_packages_only() -> None:
    """Computed from the installed metadata: what torch, transformers, lightning, peft and torchmetrics do not
    bring, never pycocoevalcap."""
    missing = missing_on_gpu_machines()
    for name in ("jsonargparse", "omegaconf", "openai-clip", "ftfy", "docstring-parser", "typeshed-client"):
        assert name in missing
    for name in (
        "torch",
        "transformers",
        "lightning",
        "tokenizers",
        "safetensors",
        "numpy",
        "regex",
        "pycocoevalcap",
    ):
        assert name not in missing
