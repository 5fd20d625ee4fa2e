"""The ``gpu`` tier: real training, generation and LoRA steps on an accelerator, in mixed precision.

Every test runs on the device ``CLIPCAP_TEST_DEVICE`` names (``cuda`` by default, ``cpu`` for the dry run
``benchmarks.gpu_check`` makes on a machine without one), so the CPU fallback runs these very tests. They
are deselected by default (``-m 'not slow and not gpu'``); run them with

    CLIPCAP_TEST_DEVICE=cuda pytest -m gpu tests/test_gpu.py

What they look for is what breaks only on an accelerator: a tensor left on the host (device mismatch), a
dtype that autocast or bf16/fp16 weights make disagree, a non-finite loss in mixed precision. Each test is
small: the tiny synthetic world, tiny LMs, a few steps.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from clipcap.captioner import ClipCaptioner
from clipcap.generation import DecodingConfig
from clipcap.lm import PrefixLM
from clipcap.mapper import MLPMapper
from clipcap.training import CaptionEvaluation
from clipcap.training.cli import lightning_cli

DEVICE = torch.device(os.environ.get("CLIPCAP_TEST_DEVICE", "cuda"))
REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = REPO / "lightning_configs" / "synthetic"
STEPS = 3
ROLLOUT = ["--model.objective.init_args.rollout.max_new_tokens=8"]
OBJECTIVES = {
    "ce": [],
    "discritune": ROLLOUT,
    "discritune_grpo": ROLLOUT,
    "gumbel_clip": [*ROLLOUT, "--data.init_args.labelled_images=8", "--data.init_args.anchor_batch_size=4"],
    "scst_cider": ROLLOUT,
    "scst_clip_s": ROLLOUT,
    "cider_retrieval": ROLLOUT,
}
"""Every objective config of ``lightning_configs/synthetic/`` and what shortens its step."""

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.type == "cuda" and not torch.cuda.is_available(),
        reason="CLIPCAP_TEST_DEVICE asks for CUDA and none is available "
        "(CLIPCAP_TEST_DEVICE=cpu runs these tests on the CPU)",
    ),
]


def test_every_objective_config_is_covered() -> None:
    assert sorted(OBJECTIVES) == sorted(path.stem for path in SYNTHETIC.glob("*.yaml"))


class StepValues(pl.Callback):
    """Every ``train/*`` value logged at each training step, and what of the module was not on ``DEVICE``
    then (checked during training: Lightning moves the module back to the CPU when ``fit`` ends)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.elsewhere: list[str] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(
            {
                key.removeprefix("train/").removesuffix("_step"): float(value)
                for key, value in trainer.callback_metrics.items()
                if key.startswith("train/") and key.endswith("_step")
            }
        )
        self.elsewhere += not_on_device(pl_module)


def fit_args(config: Path, root: Path, precision: str, *options: str) -> list[str]:
    """``clipcap fit`` of ``config`` for ``STEPS`` steps at batch 8 on ``DEVICE`` in ``precision``, without
    the config's callbacks (its evaluation would run pycocoevalcap's Java metrics)."""
    return [
        "fit", "--config", str(config), f"--trainer.accelerator={DEVICE.type}", "--trainer.devices=1",
        f"--trainer.precision={precision}", "--trainer.max_epochs=1", f"--trainer.limit_train_batches={STEPS}",
        "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.callbacks=[]",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        "--data.init_args.batch_size=8", "--trainer.default_root_dir", str(root), *options,
    ]  # fmt: skip


def fit(args: list[str], *callbacks: pl.Callback) -> tuple[pl.LightningModule, StepValues]:
    """Builds the run as ``clipcap fit`` does, adds ``callbacks`` and a recorder, and trains."""
    cli = lightning_cli(args, run=False)
    recorder = StepValues()
    cli.trainer.callbacks.extend([*callbacks, recorder])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.state.finished and cli.trainer.global_step == STEPS
    return cli.model, recorder


def not_on_device(module: torch.nn.Module) -> list[str]:
    """The parameters and buffers of ``module`` (captioner, objective state) that are not on ``DEVICE``."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return [name for name, tensor in tensors if tensor.device.type != DEVICE.type]


def assert_on_device(module: torch.nn.Module) -> None:
    elsewhere = not_on_device(module)
    assert not elsewhere, f"not on {DEVICE.type}: {elsewhere[:5]}"


def assert_finite_steps(recorder: StepValues) -> None:
    """Every step logged finite values, skipped nothing, and ran with the whole module on the device."""
    assert len(recorder.steps) == STEPS
    assert not recorder.elsewhere, (
        f"not on {DEVICE.type} during training: {sorted(set(recorder.elsewhere))[:5]}"
    )
    for step, values in enumerate(recorder.steps):
        assert "skipped_steps" not in values, f"step {step} was skipped: {values}"
        assert math.isfinite(values["loss"]), f"step {step}: {values}"
        not_finite = {name: value for name, value in values.items() if not math.isfinite(value)}
        assert not not_finite, f"step {step}: non-finite {not_finite}"


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_every_objective_fits_in_bf16_mixed(objective: str, tiny_world: Path, tmp_path: Path) -> None:
    """``clipcap fit`` of the objective's synthetic config, ``STEPS`` steps on the device in bf16-mixed:
    the run finishes, every logged training value is finite, the trained weights stay float32 (mixed
    precision keeps fp32 master weights) and everything the module holds is on the device."""
    config = SYNTHETIC / f"{objective}.yaml"
    module, recorder = fit(fit_args(config, tmp_path, "bf16-mixed", *OBJECTIVES[objective]))
    assert_finite_steps(recorder)
    trained = [p for p in module.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)


def test_discritune_with_hard_negatives_keeps_its_bank_on_the_device(
    tiny_world: Path, tmp_path: Path
) -> None:
    """Hard negatives come from the training split's cached features: the bank moves to the device once,
    not every step, and the steps stay finite."""
    options = [*ROLLOUT, "--model.objective.init_args.hard_negatives=2"]
    module, recorder = fit(fit_args(SYNTHETIC / "discritune.yaml", tmp_path, "bf16-mixed", *options))
    assert_finite_steps(recorder)
    assert module.objective.retrieval.__dict__["_bank"].device.type == DEVICE.type


def test_validation_computes_the_clip_metrics_on_the_device(tiny_world: Path, tmp_path: Path) -> None:
    """A bf16-mixed cross-entropy run validated by ``CaptionEvaluation`` with its CLIP metrics only (the NLG
    metrics need pycocoevalcap and Java, which GPU machines lack): captions are decoded on the device and
    CLIP-S, RefCLIP-S, RefCompare and retrieval come back finite."""
    evaluation = CaptionEvaluation(
        val_decoding=DecodingConfig(max_new_tokens=8), nlg_metrics=[], block_size=8, num_distractors=7
    )
    args = fit_args(SYNTHETIC / "ce.yaml", tmp_path, "bf16-mixed", "--data.init_args.eval_batch_size=8")
    args = [arg for arg in args if not arg.startswith("--trainer.limit_val_batches")]
    module, recorder = fit([*args, "--trainer.limit_val_batches=2"], evaluation)
    assert_finite_steps(recorder)
    metrics = evaluation.last_metrics
    for name in ("clip_score", "ref_clip_score", "ref_compare", "retrieval_p_at_1"):
        assert math.isfinite(metrics[name]), metrics
    assert any(path.name == "predictions.json" for path in evaluation.written)


def test_pinned_loaders_pin_the_features(tiny_world: Path) -> None:
    """``pin_memory: true`` (the real-data configs) pins each batch's features, the anchor loader's too, so
    that Lightning's non-blocking copy to the GPU overlaps compute."""
    if DEVICE.type != "cuda":
        pytest.skip("page-locked memory needs CUDA")
    from clipcap.training import SyntheticCaptions

    data = SyntheticCaptions(
        world_dir=str(tiny_world), clip_model="synthetic:clip", batch_size=4, pin_memory=True,
        labelled_images=8, unlabelled=True, anchor_batch_size=2,
    )  # fmt: skip
    data.setup("fit")
    loaders = data.train_dataloader()
    for name in ("images", "anchor"):
        assert next(iter(loaders[name])).clip_features.is_pinned(), name


# ------------------------------------------------------------------------------------------ generation

DECODINGS = {
    "greedy": DecodingConfig(max_new_tokens=12),
    "beam 5, transformers ranking": DecodingConfig(num_beams=5, max_new_tokens=12, beam_ranking="transformers"),
    "beam 5, clipcap ranking": DecodingConfig(num_beams=5, max_new_tokens=12, beam_ranking="clipcap"),
    "sampling, 3 per image": DecodingConfig(do_sample=True, num_return_sequences=3, top_k=20, max_new_tokens=12),
}  # fmt: skip


@pytest.fixture(scope="module")
def captioners(gpt2_folder: Path) -> dict[str, ClipCaptioner]:
    """The tiny GPT-2 behind an MLP mapper on the device, by the LM's weight dtype."""
    built = {}
    for lm_dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        lm = PrefixLM(str(gpt2_folder), dtype=lm_dtype)
        captioner = ClipCaptioner(lm, functools.partial(MLPMapper, prefix_length=4), clip_dim=16)
        built[lm_dtype] = captioner.to(DEVICE).eval()
    return built


@pytest.mark.parametrize("lm_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("decoding", sorted(DECODINGS))
def test_generation_on_the_device(decoding: str, lm_dtype: str, captioners) -> None:
    """Greedy, beam 5 (both rankings) and sampling under bf16 autocast, with a float32 LM (as in
    bf16-mixed training) and with bf16 LM weights (as the benchmarks decode): captions come back, the
    right number, each within the token cap, and nothing left the device."""
    captioner = captioners[lm_dtype]
    settings = DECODINGS[decoding]
    features = torch.randn(6, 16, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        ids = captioner.generate_ids(features, settings)
        captions = captioner.generate(features, settings)
    per_image = settings.num_return_sequences
    assert len(ids) == 6 * per_image and all(len(row) <= settings.max_new_tokens for row in ids)
    assert len(captions) == 6 and all(len(texts) == per_image for texts in captions)
    assert all(isinstance(text, str) for texts in captions for text in texts)
    assert_on_device(captioner)


# ------------------------------------------------------------------------------------------------ LoRA

LORA_SETTINGS = {
    "bf16 weights, bf16-mixed": ("bfloat16", "bf16-mixed", "false"),
    "fp16 weights, 16-mixed, checkpointing (the V100 config)": ("float16", "16-mixed", "true"),
}


@pytest.mark.parametrize("setting", sorted(LORA_SETTINGS))
def test_lora_on_a_tiny_llama(setting: str, tiny_world: Path, llama_folder: Path, tmp_path: Path) -> None:
    """Cross-entropy with LoRA on a tiny LLaMA whose base is in bf16, or in fp16 with gradient checkpointing
    and ``16-mixed`` as ``lightning_configs/coco/llama2_lora_ce.yaml`` (CUDA only): finite losses, everything
    on the device, the adapters changed and stayed float32, the base kept its dtype and did not change."""
    dtype, precision, checkpointing = LORA_SETTINGS[setting]
    if precision == "16-mixed" and DEVICE.type == "cpu":
        pytest.skip(
            "on a CPU Lightning runs 16-mixed as bf16-mixed, whose autocast cannot mix fp16 weights "
            "(CaptionModule refuses the pair): the V100 setting needs CUDA"
        )
    lm = "--model.captioner.init_args.language_model.init_args"
    args = fit_args(
        SYNTHETIC / "ce.yaml", tmp_path, precision,
        f"{lm}.pretrained={llama_folder}", f"{lm}.trainable=false", f"{lm}.dtype={dtype}",
        f"{lm}.gradient_checkpointing={checkpointing}", f"{lm}.lora.rank=4",
        "--model.captioner.init_args.mapper.init_args.prefix_length=3", "--model.optimizer.init_args.lr=0.05",
    )  # fmt: skip
    cli = lightning_cli(args, run=False)
    module = cli.model
    before = {key: value.detach().clone() for key, value in module.captioner.state_dict().items()}
    recorder = StepValues()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert cli.trainer.state.finished and cli.trainer.global_step == STEPS
    assert_finite_steps(recorder)
    after = module.captioner.state_dict()
    changed = {key for key, value in after.items() if not torch.equal(value.cpu(), before[key])}
    assert any("lora_B" in key for key in changed)
    assert all(key.startswith("mapper.") or "lora_" in key for key in changed), sorted(changed)
    weights = dict(module.captioner.lm.named_parameters())
    assert {p.dtype for name, p in weights.items() if "lora_" not in name} == {getattr(torch, dtype)}
    assert all(p.dtype == torch.float32 for name, p in weights.items() if "lora_" in name)
