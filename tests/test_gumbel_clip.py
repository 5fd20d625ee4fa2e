"""Gumbel-CLIP: the loss is −cos with CLIP's own text features, gradients reach what trains, the anchor and
KL terms, the temperature anneal across checkpoints, and the configs of the two-stage recipe."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipcap.data.batch import collate_caption_batch
from clipcap.gumbel import GumbelRollout, gumbel_rollout
from clipcap.objectives import GumbelClip
from clipcap.training import CaptionModule, SyntheticCaptions
from clipcap.training.cli import lightning_cli
from clipcap.training.data import CaptionImages, CaptionPairs
from tiny_models import tiny_captioner

REPO = Path(__file__).resolve().parents[1]
CE_CONFIG = str(REPO / "lightning_configs" / "synthetic" / "ce.yaml")
GC_CONFIG = str(REPO / "lightning_configs" / "synthetic" / "gumbel_clip.yaml")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.logger=false"]
# The tiny world has 64 training images: 8 labelled, the pool is the other 56.
TINY_DATA = ["--data.init_args.labelled_images=8", "--data.init_args.batch_size=8",
             "--data.init_args.anchor_batch_size=4", "--trainer.limit_val_batches=0"]  # fmt: skip


@pytest.fixture(scope="module")
def world(tiny_world: Path):
    datamodule = SyntheticCaptions(world_dir=str(tiny_world), clip_model="synthetic:clip")
    images = CaptionImages(datamodule.split("train"))
    pairs = CaptionPairs(datamodule.split("train"))
    batch = collate_caption_batch([images[i] for i in range(6)])
    batch.anchor = collate_caption_batch([pairs[i] for i in range(4)])
    return datamodule, batch


def objective_for(datamodule, **options) -> GumbelClip:
    objective = GumbelClip(rollout=GumbelRollout(max_new_tokens=10), **options)
    objective.setup(datamodule.training_data())
    return objective


@pytest.mark.parametrize("trainable", [True, False])
def test_the_loss_is_minus_the_cosine_with_clips_own_text_features(trainable: bool, world) -> None:
    datamodule, batch = world
    torch.manual_seed(0)
    captioner = tiny_captioner(datamodule.clip_dim, trainable=trainable)
    objective = objective_for(datamodule)
    torch.manual_seed(0)
    output = objective(captioner, batch)
    # The same rollout (same noise and dropout draws), decoded and read by CLIP as plain text, gives the
    # same cosine: straight-through samples are exact in the forward pass.
    torch.manual_seed(0)
    caption = gumbel_rollout(captioner, batch.clip_features, objective.rollout)
    text = objective.text_path(captioner)
    decoded = text.captions(caption.token_ids, caption.lengths)
    assert any(decoded), "the rollout should produce some text"
    cosine = F.cosine_similarity(text.clip.encode_text(decoded), batch.clip_features, dim=-1)
    torch.testing.assert_close(output.terms["cosine"], cosine.mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.loss, -cosine.mean(), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(output.loss)

    output.loss.backward()
    mapper_grads = [p.grad for p in captioner.mapper.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in mapper_grads)
    assert any(g.abs().sum() > 0 for g in mapper_grads)
    lm_grads = [p.grad for p in captioner.lm.parameters()]
    if trainable:
        assert any(g is not None and g.abs().sum() > 0 for g in lm_grads)
    else:
        assert all(g is None for g in lm_grads), "a frozen LM must get no parameter gradients"
    assert all(p.grad is None for p in text.clip.parameters())


def test_the_anchor_adds_lambda_times_cross_entropy(world) -> None:
    datamodule, batch = world
    captioner = tiny_captioner(datamodule.clip_dim)
    outputs = {}
    for weight in (0.0, 0.5):
        torch.manual_seed(0)
        outputs[weight] = objective_for(datamodule, anchor_weight=weight)(captioner, batch)
    anchor = outputs[0.5].terms["anchor_ce"]
    assert anchor > 0 and "anchor_ce" not in outputs[0.0].terms
    torch.testing.assert_close(outputs[0.5].loss, outputs[0.0].loss + 0.5 * anchor)
    unanchored = type(batch)(image_ids=batch.image_ids, clip_features=batch.clip_features)
    with pytest.raises(ValueError, match="anchor_batch_size"):
        objective_for(datamodule, anchor_weight=1.0)(captioner, unanchored)


@pytest.mark.parametrize("trainable", [True, False])
def test_the_kl_term_to_the_frozen_lm(trainable: bool, world) -> None:
    datamodule, batch = world
    captioner = tiny_captioner(datamodule.clip_dim, trainable=trainable)
    outputs = {}
    for beta in (0.0, 0.3):
        torch.manual_seed(0)
        outputs[beta] = objective_for(datamodule, kl_coefficient=beta)(captioner, batch)
    kl = outputs[0.3].terms["kl"]
    assert kl > 0  # the image prefix changes the LM's predictions
    torch.testing.assert_close(outputs[0.3].loss, outputs[0.0].loss + 0.3 * kl)
    outputs[0.3].loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in captioner.mapper.parameters())


def test_the_temperature_anneals_geometrically_and_is_refused_when_not_positive() -> None:
    objective = GumbelClip(rollout=GumbelRollout(temperature=2.0), final_temperature=0.5, anneal_steps=4)
    seen = []
    for step in range(6):
        objective.steps.fill_(step)
        seen.append(objective.temperature)
    assert seen == pytest.approx([2.0, 2.0 * 0.25**0.25, 1.0, 2.0 * 0.25**0.75, 0.5, 0.5])
    assert GumbelClip().temperature == 1.0
    for bad in (dict(final_temperature=0.0, anneal_steps=3), dict(final_temperature=0.5)):
        with pytest.raises(ValueError):
            GumbelClip(**bad)
    with pytest.raises(ValueError, match="temperature"):
        GumbelRollout(temperature=0.0)


def test_non_finite_losses_skip_the_step(world, monkeypatch: pytest.MonkeyPatch) -> None:
    datamodule, batch = world
    captioner = tiny_captioner(datamodule.clip_dim)
    objective = objective_for(datamodule)
    text = objective.text_path(captioner)
    monkeypatch.setattr(text, "encode", lambda *args: torch.full((len(batch), datamodule.clip_dim), math.nan))
    output = objective(captioner, batch)
    assert output.skip and output.skip_reason == "GumbelClip: non-finite loss" and int(objective.steps) == 0


def test_a_clip_other_than_the_features_is_refused(world) -> None:
    datamodule, _ = world
    with pytest.raises(ValueError, match="same CLIP|one CLIP"):
        GumbelClip(clip_model="some/other-clip").setup(datamodule.training_data())


# ------------------------------------------------------------------------------ the two-stage recipe


@pytest.fixture(scope="module")
def stage1(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Stage 1: cross-entropy on the 8 labelled images of the tiny world; its last checkpoint."""
    cli = lightning_cli(
        ["fit", "--config", CE_CONFIG, "--trainer.default_root_dir", str(tmp_path_factory.mktemp("stage1")),
         "--data.init_args.labelled_images=8", "--trainer.max_epochs=1", "--trainer.limit_val_batches=0", *QUIET]
    )  # fmt: skip
    return cli.trainer.checkpoint_callback.last_model_path


def test_stage_two_trains_on_the_pool_with_the_anchor_and_resumes_its_anneal(stage1, tmp_path: Path) -> None:
    options = ["fit", "--config", GC_CONFIG, f"--model.init_from={stage1}", *TINY_DATA, *QUIET,
               "--model.objective.init_args.final_temperature=0.5", "--model.objective.init_args.anneal_steps=10",
               "--model.objective.init_args.rollout.max_new_tokens=8"]  # fmt: skip
    cli = lightning_cli(
        [*options, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.default_root_dir",
         str(tmp_path / "a")]
    )  # fmt: skip
    objective = cli.model.objective
    assert isinstance(objective, GumbelClip) and int(objective.steps) == 2
    assert len(cli.datamodule.split("train").images) == 56  # the pool: the labelled 8 are kept out
    assert "train/anchor_ce" in cli.trainer.callback_metrics
    resumed = lightning_cli(
        [*options, "--trainer.max_epochs=2", "--trainer.limit_train_batches=2", "--trainer.default_root_dir",
         str(tmp_path / "b"), "--ckpt_path", cli.trainer.checkpoint_callback.last_model_path]
    )  # fmt: skip
    assert int(resumed.model.objective.steps) == 4  # the anneal continues where it stopped
    assert resumed.model.objective.temperature == pytest.approx(0.5 ** (4 / 10))
    reloaded = CaptionModule.load_from_checkpoint(
        resumed.trainer.checkpoint_callback.last_model_path, map_location="cpu", weights_only=False
    )
    assert int(reloaded.objective.steps) == 4


def test_a_temperature_of_zero_is_refused_at_start_up(stage1, tmp_path: Path) -> None:
    with pytest.raises((ValueError, SystemExit)):
        lightning_cli(
            ["fit", "--config", GC_CONFIG, f"--model.init_from={stage1}", *TINY_DATA, *QUIET,
             "--model.objective.init_args.rollout.temperature=0", "--trainer.default_root_dir", str(tmp_path)],
            run=False,
        )  # fmt: skip


def test_switching_a_cross_entropy_config_to_gumbel_clip(stage1, tmp_path: Path) -> None:
    cli = lightning_cli(
        ["fit", "--config", CE_CONFIG, "--model.objective=GumbelClip", f"--model.init_from={stage1}",
         "--model.objective.init_args.rollout.max_new_tokens=8", "--trainer.fast_dev_run=true",
         "--data.init_args.batch_size=8", "--trainer.default_root_dir", str(tmp_path), *QUIET]
    )  # fmt: skip
    assert cli.trainer.state.finished and isinstance(cli.model.objective, GumbelClip)
    assert torch.isfinite(cli.trainer.callback_metrics["train/cosine"])


@pytest.mark.parametrize("mapper", ["MLPMapper", "TransformerMapper"])
@pytest.mark.parametrize("trainable", [True, False])
def test_the_four_variants_of_the_paper_train(
    mapper: str, trainable: bool, tiny_world: Path, tmp_path: Path
) -> None:
    """Jin (2023)'s variants: MLP or Transformer mapper, LM finetuned or frozen, each a few Gumbel-CLIP steps
    with the anchor; only what trains changes."""
    cli = lightning_cli(
        ["fit", "--config", GC_CONFIG, *TINY_DATA, *QUIET, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
         f"--model.captioner.init_args.mapper={mapper}", "--model.captioner.init_args.mapper.init_args.prefix_length=4",
         *(["--model.captioner.init_args.mapper.init_args.num_layers=1",
            "--model.captioner.init_args.mapper.init_args.num_heads=4"] if mapper == "TransformerMapper" else []),
         f"--model.captioner.init_args.language_model.init_args.trainable={str(trainable).lower()}",
         "--model.objective.init_args.rollout.max_new_tokens=6", "--trainer.default_root_dir", str(tmp_path)],
        run=False,
    )  # fmt: skip
    module = cli.model
    before = {k: v.clone() for k, v in module.captioner.state_dict().items()}
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert int(module.objective.steps) == 2
    after = module.captioner.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert any(k.startswith("mapper.") for k in changed)
    assert any(k.startswith("lm.") for k in changed) == trainable
