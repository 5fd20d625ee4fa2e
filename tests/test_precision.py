"""bf16 mixed precision: every objective trains under ``bf16-mixed`` on CPU with the losses of ``32-true``
to bf16's accuracy, while CLIP similarities and rewards stay float32 under autocast.

Tolerance. bf16 keeps 8 significant bits: one rounding is off by at most 2⁻⁹ ≈ 2·10⁻³ relative (unit
roundoff u). A loss that is a mean over many tokens averages its rounding errors, so it lands much closer
than u (cross-entropy here: ~10⁻⁵); a few roundings in a row on a path that does not average (a reward, a
cosine) can reach a few u. ``BF16 = 1e-2`` (≈ 5 u) admits that and still catches any real difference: a
changed caption moves DiscriTune's loss by tens of percent, a wrong term moves a loss by far more than 1%.
Values computed in float32 on both sides (rewards, the baseline) are compared at float32 accuracy instead.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision

from clipcap.data.batch import collate_caption_batch
from clipcap.generation import DecodingConfig
from clipcap.gumbel import GumbelRollout
from clipcap.objectives import DiscriTune, GumbelClip
from clipcap.objectives.rewards import (
    cosine_reward,
    discriminative_reward,
    discriminative_reward_with_negatives,
    hard_negative_indices,
)
from clipcap.training import SyntheticCaptions
from clipcap.training.cli import lightning_cli
from clipcap.training.data import CaptionImages, CaptionPairs
from tiny_models import tiny_captioner

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = REPO / "lightning_configs" / "synthetic"
BF16 = 1e-2  # relative; see the module docstring
FP32 = 1e-6
OPTIONS = {
    "ce": ["--data.init_args.batch_size=8"],
    "discritune": ["--data.init_args.batch_size=8", "--model.objective.init_args.rollout.max_new_tokens=8"],
    "gumbel_clip": ["--data.init_args.labelled_images=8", "--data.init_args.anchor_batch_size=4",
                    "--data.init_args.batch_size=8", "--model.objective.init_args.rollout.max_new_tokens=8"],
}  # fmt: skip


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


# ------------------------------------------------------------------------------------ the reward maths


def embeddings(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(texts (8, 64), images (8, 64), negatives (8, 3, 64), targets (8,)), float32."""
    generator = torch.Generator().manual_seed(seed)
    texts, images = torch.randn(8, 64, generator=generator), torch.randn(8, 64, generator=generator)
    return texts, images, torch.randn(8, 3, 64, generator=generator), torch.arange(8)


REWARDS = {
    "discriminative": lambda t, i, n, y: discriminative_reward(t, i, y, logit_scale=100.0),
    "with_negatives": lambda t, i, n, y: discriminative_reward_with_negatives(t, i, y, n, logit_scale=100.0),
    "cosine": lambda t, i, n, y: cosine_reward(t, i, y),
}


@pytest.mark.parametrize("inputs", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(REWARDS))
def test_rewards_are_float32_under_bf16_autocast(name: str, inputs: torch.dtype) -> None:
    """Under autocast a matmul runs in bf16 whatever its inputs; with CLIP's logit scale of 100 that moves a
    reward by ~0.1 nat. The reward must be the float32 one, from float32 or bf16 embeddings alike."""
    texts, images, negatives, targets = embeddings()
    reward = REWARDS[name]
    expected = reward(texts, images, negatives, targets)
    low = [tensor.to(inputs) for tensor in (texts, images, negatives)]
    with bf16_autocast():
        got = reward(*low, targets)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reward(*(x.float() for x in low), targets), rtol=FP32, atol=FP32)
    if inputs == torch.float32:
        torch.testing.assert_close(got, expected, rtol=FP32, atol=FP32)


def test_hard_negatives_are_ranked_in_float32_under_bf16_autocast() -> None:
    generator = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(8, 64, generator=generator), torch.randn(256, 64, generator=generator)
    exclude = torch.full((8, 1), -1)
    expected = hard_negative_indices(queries, bank, exclude, count=8)
    with bf16_autocast():
        got = hard_negative_indices(queries, bank, exclude, count=8)
    assert torch.equal(got, expected)  # bf16 similarities reorder near neighbours (3 of 64 here)


# ----------------------------------------------------------------------------- the objectives' steps


@pytest.fixture(scope="module")
def world(tiny_world: Path):
    datamodule = SyntheticCaptions(world_dir=str(tiny_world), clip_model="synthetic:clip")
    images = CaptionImages(datamodule.split("train"))
    batch = collate_caption_batch([images[i] for i in range(8)])
    pairs = CaptionPairs(datamodule.split("train"))
    batch.anchor = collate_caption_batch([pairs[i] for i in range(4)])
    return datamodule, batch


def test_discritune_scores_captions_in_float32_under_bf16_autocast(
    world, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bf16-mixed DiscriTune step: the rollout and log π run under autocast, but the receiver reads the
    captions and rewards them in float32: the reward equals the one computed outside autocast."""
    datamodule, batch = world
    torch.manual_seed(0)
    captioner = tiny_captioner(datamodule.clip_dim)
    objective = DiscriTune(rollout=DecodingConfig(max_new_tokens=8, stop_at_period=True))
    objective.setup(datamodule.training_data())
    texts: list[list[str]] = []
    decode = DiscriTune._texts
    monkeypatch.setattr(
        DiscriTune, "_texts", staticmethod(lambda c, ids: texts.append(decode(c, ids)) or texts[-1])
    )
    with bf16_autocast():
        output = objective(captioner, batch)
    receiver = objective.receiver
    expected = discriminative_reward(
        receiver.encode_text(texts[0]), batch.clip_features, torch.arange(len(batch)), receiver.logit_scale
    )
    assert output.terms["reward"].dtype == torch.float32
    torch.testing.assert_close(output.terms["reward"], expected.mean(), rtol=FP32, atol=FP32)
    assert torch.isfinite(output.loss) and output.loss.requires_grad


def test_gumbel_clip_cosine_is_float32_under_bf16_autocast(world, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16-mixed Gumbel-CLIP step: the CLIP text tower runs under autocast (it is on the gradient path),
    and the cosine of its embeddings with the image features is taken in float32."""
    datamodule, batch = world
    torch.manual_seed(0)
    captioner = tiny_captioner(datamodule.clip_dim)
    objective = GumbelClip(rollout=GumbelRollout(max_new_tokens=8))
    objective.setup(datamodule.training_data())
    text = objective.text_path(captioner)
    seen: list[torch.Tensor] = []
    encode = text.encode
    monkeypatch.setattr(text, "encode", lambda *args: seen.append(encode(*args)) or seen[-1])
    with bf16_autocast():
        output = objective(captioner, batch)
    cosine = output.terms["cosine"]
    assert cosine.dtype == torch.float32 and output.loss.dtype == torch.float32
    expected = F.cosine_similarity(seen[0].detach().float(), batch.clip_features.float(), dim=-1).mean()
    torch.testing.assert_close(cosine, expected, rtol=FP32, atol=FP32)


# -------------------------------------------------------------------------- bf16-mixed fit vs 32-true


class StepValues(pl.Callback):
    """Records every ``train/*`` value of each training step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(
            {
                key.removeprefix("train/").removesuffix("_step"): float(value)
                for key, value in trainer.callback_metrics.items()
                if key.startswith("train/") and key.endswith("_step")
            }
        )


def first_steps(name: str, precision: str, root: Path, steps: int = 3) -> list[dict[str, float]]:
    """The logged values of the first ``steps`` training steps of an objective's synthetic config."""
    cli = lightning_cli(
        ["fit", "--config", str(SYNTHETIC / f"{name}.yaml"), *OPTIONS[name], f"--trainer.precision={precision}",
         "--trainer.max_epochs=1", f"--trainer.limit_train_batches={steps}", "--trainer.limit_val_batches=0",
         "--trainer.callbacks=[]", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
         "--trainer.enable_progress_bar=false", "--trainer.default_root_dir", str(root / precision)],
        run=False,
    )  # fmt: skip
    recorder = StepValues()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert len(recorder.steps) == steps
    return recorder.steps


def test_bf16_mixed_cross_entropy_matches_fp32(tiny_world: Path, tmp_path: Path) -> None:
    """Same seed and data: the first 3 cross-entropy losses under bf16-mixed equal fp32's within BF16."""
    full, mixed = (first_steps("ce", precision, tmp_path) for precision in ("32-true", "bf16-mixed"))
    for step, (a, b) in enumerate(zip(full, mixed, strict=True)):
        assert b["loss"] == pytest.approx(a["loss"], rel=BF16), step
        assert b["token_accuracy"] == pytest.approx(a["token_accuracy"], abs=0.05), step


def test_bf16_mixed_gumbel_clip_matches_fp32(tiny_world: Path, tmp_path: Path) -> None:
    """Same seed: the same Gumbel noise and dropout draws in both runs. The first 3 losses (−cos + the
    anchor's cross-entropy) agree within BF16; the cosine, a small number (~0.1) read through CLIP's text
    tower under autocast, within a few bf16 roundings of 1 (absolute 5·10⁻³)."""
    full, mixed = (first_steps("gumbel_clip", precision, tmp_path) for precision in ("32-true", "bf16-mixed"))
    for step, (a, b) in enumerate(zip(full, mixed, strict=True)):
        assert b["loss"] == pytest.approx(a["loss"], rel=BF16), step
        assert b["anchor_ce"] == pytest.approx(a["anchor_ce"], rel=BF16), step
        assert b["cosine"] == pytest.approx(a["cosine"], abs=5e-3), step


def test_bf16_mixed_discritune_matches_fp32(tiny_world: Path, tmp_path: Path, monkeypatch) -> None:
    """DiscriTune's rollout is greedy and discrete: bf16 logits can flip a near-tied token, and after two
    updates made in bf16 they do here (step 3's captions differ), so only what is comparable is compared.

    Step 1: the same weights give the same greedy captions in both runs (checked), so the float32 receiver
    gives them the same reward to float32 accuracy; log π and the loss ``−R · log π`` (baseline 0) agree
    within BF16. Step 2: the baseline (step 1's mean −R) is the same to float32 accuracy, and when step 2's
    captions are again the same (they are here), so is the reward, and the loss agrees within BF16. That
    loss, ``(−R − b) · log π`` with −R − b ≈ −0.1, is a difference of two numbers near 2.4: computed in bf16
    the reward's rounding alone moved it by 2%, which is what the float32 reward avoids.
    """
    captions: dict[str, list[list[str]]] = {}
    decode = DiscriTune._texts
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        seen = captions.setdefault(precision, [])
        monkeypatch.setattr(
            DiscriTune,
            "_texts",
            staticmethod(lambda c, ids, seen=seen: seen.append(decode(c, ids)) or seen[-1]),
        )
        runs[precision] = first_steps("discritune", precision, tmp_path)
    full, mixed = runs["32-true"], runs["bf16-mixed"]
    assert captions["bf16-mixed"][0] == captions["32-true"][0], "step 1's greedy captions should not move"
    assert mixed[0]["reward"] == pytest.approx(full[0]["reward"], rel=FP32)
    assert mixed[0]["baseline"] == full[0]["baseline"] == 0.0
    assert mixed[0]["log_prob"] == pytest.approx(full[0]["log_prob"], rel=BF16)
    assert mixed[0]["loss"] == pytest.approx(full[0]["loss"], rel=BF16)
    assert mixed[1]["baseline"] == pytest.approx(full[1]["baseline"], rel=FP32)
    if captions["bf16-mixed"][1] == captions["32-true"][1]:
        assert mixed[1]["reward"] == pytest.approx(full[1]["reward"], rel=FP32)
        assert mixed[1]["log_prob"] == pytest.approx(full[1]["log_prob"], rel=BF16)
        assert mixed[1]["loss"] == pytest.approx(full[1]["loss"], rel=BF16)


# ------------------------------------------------------------------- gradient clipping, fused optimizer


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_a_fused_optimizer_clips_gradients_like_a_plain_one_under_mixed_precision(
    world, precision: str
) -> None:
    """Lightning refuses to clip gradients for a fused optimizer (the configs' default) under mixed
    precision; CaptionModule clips them itself, unscaling fp16 gradients first. One clipped SGD step (whose
    update is the clipped gradient itself) leaves the same weights as the per-tensor SGD through
    Lightning's own clipping, and a much smaller update than without clipping."""
    from torch.utils.data import DataLoader

    from clipcap.objectives import CrossEntropy
    from clipcap.training import CaptionModule

    datamodule, _ = world
    pairs = CaptionPairs(datamodule.split("train"))
    loader = DataLoader([pairs[i] for i in range(8)], batch_size=8, collate_fn=collate_caption_batch)

    def one_step(fused: bool, clip: float | None) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        module = CaptionModule(
            tiny_captioner(datamodule.clip_dim),
            CrossEntropy(),
            optimizer=lambda params: torch.optim.SGD(params, lr=1.0, fused=fused),
        )
        before = {k: v.clone() for k, v in module.captioner.mapper.state_dict().items()}
        # Lightning turns "16-mixed" into bf16 on a CPU; the plugin itself keeps fp16 and a GradScaler.
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if precision == "16-mixed" else None
        trainer = pl.Trainer(
            max_steps=1, plugins=[MixedPrecision(precision, "cpu", scaler)], gradient_clip_val=clip,
            accelerator="cpu", logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0,
        )  # fmt: skip
        trainer.fit(module, train_dataloaders=loader)
        return {k: v - before[k] for k, v in module.captioner.mapper.state_dict().items()}

    plain, fused, unclipped = one_step(False, 0.01), one_step(True, 0.01), one_step(True, None)
    norm = torch.cat([update.flatten() for update in fused.values()]).norm()
    assert norm < 0.011 < torch.cat([update.flatten() for update in unclipped.values()]).norm()
    for key, update in plain.items():
        torch.testing.assert_close(fused[key], update, rtol=1e-4, atol=1e-7)


def test_clipping_by_norm_under_fsdp_goes_to_the_root_fsdp_module(world) -> None:
    """Lightning refuses norm clipping under FSDP (torch's clip_grad_norm_ would see one rank's shard);
    CaptionModule asks the root FSDP module, whose clip_grad_norm_ takes the norm over every shard. FSDP
    cannot run on a CPU, so the root is a stand-in that records the call."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.strategies import FSDPStrategy

    from clipcap.objectives import CrossEntropy
    from clipcap.training import CaptionModule

    datamodule, _ = world
    module = CaptionModule(tiny_captioner(datamodule.clip_dim), CrossEntropy())
    calls: list[float] = []
    strategy = FSDPStrategy()
    strategy.model = SimpleNamespace(clip_grad_norm_=calls.append)
    module._trainer = SimpleNamespace(strategy=strategy, precision_plugin=Precision())
    optimizer = module.configure_optimizers()
    module.configure_gradient_clipping(optimizer, 1.0, "norm")
    assert calls == [1.0]
    strategy.model = torch.nn.Linear(2, 2)  # not wrapped by FSDP: refused with the way out
    with pytest.raises(RuntimeError, match="gradient_clip_algorithm=value"):
        module.configure_gradient_clipping(optimizer, 1.0, "norm")


@pytest.mark.parametrize(("lm_dtype", "precision"), [("float16", "bf16-mixed"), ("bfloat16", "16-mixed")])
def test_lm_weights_of_the_other_16_bit_type_than_autocast_are_refused_at_setup(
    lm_dtype: str, precision: str, tiny_world: Path, tmp_path: Path
) -> None:
    """Autocast cannot join two 16-bit tensors of the other 16-bit type (torch.cat raises "Unexpected floating
    ScalarType"): fp16 weights under bf16-mixed are refused before any step, naming both fixes. (On a CPU
    16-mixed runs as bf16-mixed, so bf16 weights pass there.)"""
    cli = lightning_cli(
        ["fit", "--config", str(SYNTHETIC / "ce.yaml"), f"--trainer.precision={precision}",
         "--trainer.accelerator=cpu", f"--model.captioner.init_args.language_model.init_args.dtype={lm_dtype}",
         "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0",
         "--trainer.callbacks=[]", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
         "--trainer.enable_progress_bar=false", "--trainer.default_root_dir", str(tmp_path)],
        run=False,
    )  # fmt: skip
    if lm_dtype == "bfloat16":  # 16-mixed became bf16-mixed on this CPU: the same type, accepted
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        assert cli.trainer.global_step == 1
        return
    with pytest.raises(
        ValueError, match=r"autocasts to bfloat16.*dtype=bfloat16 or trainer.precision=16-mixed"
    ):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
