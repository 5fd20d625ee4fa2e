"""The policy-gradient objective: DiscriTune as its preset (today's numbers), every advantage estimator by
hand, reward mixtures, CLIP-S and length rewards, SCST on the tiny world, and bad input refused at start-up."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from clipcap.data.batch import collate_caption_batch
from clipcap.generation import DecodingConfig
from clipcap.objectives import (
    SCST,
    CiderReward,
    ClipScoreReward,
    CumulativeMeanBaseline,
    DiscriTune,
    GroupNormalisedAdvantage,
    LeaveOneOutBaseline,
    LengthReward,
    MovingAverageBaseline,
    PolicyGradient,
    RetrievalReward,
    SelfCriticalBaseline,
)
from clipcap.objectives.base import TrainingData
from clipcap.training import SyntheticCaptions
from clipcap.training.data import CaptionImages
from discritune_fingerprints import fingerprints
from tiny_models import tiny_captioner
from two_processes import csv_rows, run_two_processes

RECORDED = Path(__file__).parent / "data" / "discritune_fingerprints.json"


@pytest.fixture(scope="module")
def world_batch(tiny_world: Path):
    datamodule = SyntheticCaptions(world_dir=str(tiny_world), clip_model="synthetic:clip")
    images = CaptionImages(datamodule.split("train"))
    return datamodule, collate_caption_batch([images[i] for i in range(8)])


def test_the_discritune_preset_keeps_todays_loss_and_gradients(world_batch) -> None:
    """Two steps under each setting DiscriTune's options reach (faithful, cosine, mean log π, eval-mode
    rollout, KL shaping, hard negatives, moving average, self-critical, leave-one-out): loss, every logged
    term and the gradients equal those recorded from the objective before it became a preset."""
    recorded = json.loads(RECORDED.read_text())
    datamodule, batch = world_batch
    now = fingerprints(datamodule, batch)
    assert now.keys() == recorded.keys()
    for setting, steps in recorded.items():
        for step, (before, after) in enumerate(zip(steps, now[setting], strict=True)):
            for key, value in before.items():
                assert key in after, (setting, step, key)
                assert after[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (setting, step, key)


# ------------------------------------------------------------------------------ advantages by hand

REWARDS = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 2.0, -1.0, 0.5, 4.0])  # 3 images × K = 3, image-major


def test_cumulative_mean_and_moving_average_by_hand() -> None:
    cumulative, moving = CumulativeMeanBaseline(), MovingAverageBaseline(decay=0.5)
    for estimator in (cumulative, moving):  # first step: no past, the advantage is the reward
        torch.testing.assert_close(estimator(REWARDS, 3).advantages, REWARDS)
        estimator.update(REWARDS)
    second = REWARDS + 1.0
    mean1, mean2 = REWARDS.mean().item(), second.mean().item()
    torch.testing.assert_close(cumulative(second, 3).advantages, second - mean1)
    torch.testing.assert_close(moving(second, 3).advantages, second - mean1)
    cumulative.update(second)
    moving.update(second)
    third = REWARDS * 2
    torch.testing.assert_close(cumulative(third, 3).advantages, third - (mean1 + mean2) / 2)
    torch.testing.assert_close(moving(third, 3).advantages, third - (0.5 * mean1 + 0.5 * mean2))


def test_self_critical_by_hand() -> None:
    greedy = torch.tensor([2.0, 1.0, 0.0])
    estimate = SelfCriticalBaseline()(REWARDS, 3, greedy)
    torch.testing.assert_close(estimate.advantages, REWARDS - greedy.repeat_interleave(3))
    with pytest.raises(ValueError, match="greedy"):
        SelfCriticalBaseline()(REWARDS, 3)


def test_leave_one_out_by_hand() -> None:
    advantages = LeaveOneOutBaseline()(REWARDS, 3).advantages
    expected = []
    for image in range(3):
        group = REWARDS[3 * image : 3 * image + 3].tolist()
        expected += [r - (sum(group) - r) / 2 for r in group]
    torch.testing.assert_close(advantages, torch.tensor(expected))
    assert advantages[3:6].tolist() == [0.0, 0.0, 0.0]  # equal rewards: zero advantage


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_normalised_by_hand(scale: str) -> None:
    advantages = GroupNormalisedAdvantage(scale=scale)(REWARDS, 3).advantages
    assert torch.isfinite(advantages).all()
    values = REWARDS.tolist()
    batch_mean = sum(values) / len(values)
    batch_std = math.sqrt(sum((v - batch_mean) ** 2 for v in values) / (len(values) - 1))
    expected = []
    for image in range(3):
        group = values[3 * image : 3 * image + 3]
        mean = sum(group) / 3
        std = math.sqrt(sum((v - mean) ** 2 for v in group) / 2)  # unbiased, as torch.std and TRL
        divisor = {"group": std + 1e-4, "batch": batch_std + 1e-4, "none": 1.0}[scale]
        expected += [(v - mean) / divisor for v in group]
    torch.testing.assert_close(advantages, torch.tensor(expected))
    assert advantages[3:6].tolist() == [0.0, 0.0, 0.0]  # the group of equal rewards: 0, never NaN


def test_all_equal_rewards_give_zero_advantages_everywhere() -> None:
    equal = torch.full((6,), 0.7)
    for estimator in (
        GroupNormalisedAdvantage(),
        GroupNormalisedAdvantage(scale="batch"),
        LeaveOneOutBaseline(),
    ):
        advantages = estimator(equal, 3).advantages
        assert torch.isfinite(advantages).all() and advantages.abs().max() == 0


def test_the_loss_is_minus_advantage_times_log_pi(world_batch) -> None:
    """With log π and the advantages in hand, the objective's loss is mean(−A · log π)."""
    datamodule, batch = world_batch
    torch.manual_seed(0)
    captioner = tiny_captioner(datamodule.clip_dim, trainable=True).eval()
    objective = PolicyGradient(
        rewards=[LengthReward()],
        advantage=GroupNormalisedAdvantage(),
        rollout=DecodingConfig(do_sample=True, max_new_tokens=8),
        samples_per_image=3,
        log_prob_normalisation="mean",
        rollout_dropout=False,
    )
    objective.setup(datamodule.training_data())
    seen = {}
    original = objective._normalise

    def spy(*args, **kwargs):
        seen.setdefault("log_probs", original(*args, **kwargs))
        return seen["log_probs"]

    objective._normalise = spy
    captured = {}
    original_advantage = objective.advantage.forward

    def advantage_spy(rewards, k, greedy=None):
        captured["rewards"] = rewards.clone()
        result = original_advantage(rewards, k, greedy)
        captured["advantages"] = result.advantages
        return result

    objective.advantage.forward = advantage_spy
    output = objective(captioner, batch)
    assert output.terms["captions"] == 24
    expected = (-captured["advantages"] * seen["log_probs"]).mean()
    torch.testing.assert_close(output.loss, expected)
    # The rewards are minus each caption's word count, and each group's advantages sum to zero.
    torch.testing.assert_close(captured["advantages"].view(8, 3).sum(1), torch.zeros(8), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ rewards


def test_a_mixture_is_the_weighted_sum_of_its_parts(world_batch) -> None:
    datamodule, batch = world_batch
    parts = {
        "retrieval": RetrievalReward(),
        "clip_s": ClipScoreReward(),
        "cider": CiderReward(),
        "length": LengthReward(target=6),
    }
    weights = {"retrieval": 0.5, "clip_s": 2.0, "cider": 1.5, "length": -0.1}
    mixture = PolicyGradient(
        rewards=[type(r)(weight=weights[n], **_settings(r)) for n, r in parts.items()],
        rollout=DecodingConfig(max_new_tokens=10, stop_at_period=True),
    )
    mixture.setup(datamodule.training_data())
    for reward in parts.values():
        reward.setup(datamodule.training_data(), {})
    from clipcap.objectives.reward_functions import RolloutCaptions

    texts = ["a red circle.", "a large blue square at the top left.", "", "two shapes", "a", "b c d e f g h i",
             "a small green triangle.", "the the the"]  # fmt: skip
    captions = RolloutCaptions(texts, torch.arange(8), batch)
    with torch.no_grad():
        total, terms = mixture._rewards(captions)
        separate = {name: reward(captions).values for name, reward in parts.items()}
    expected = sum(weights[name] * values for name, values in separate.items())
    torch.testing.assert_close(total, expected)
    for name, values in separate.items():
        torch.testing.assert_close(terms[f"reward/{name}"], values.mean())
    assert separate["length"].tolist() == [-3.0, -2.0, -6.0, -4.0, -5.0, -2.0, -2.0, -3.0]


def _settings(reward) -> dict:
    return {"target": reward.target} if isinstance(reward, LengthReward) else {}


def test_clip_score_reward_is_hessels_formula(world_batch) -> None:
    datamodule, batch = world_batch
    reward = ClipScoreReward()
    reward.setup(datamodule.training_data(), {})
    from clipcap.objectives.reward_functions import RolloutCaptions

    texts = ["a red circle.", "a blue square."] * 4
    with torch.no_grad():
        values = reward(RolloutCaptions(texts, torch.arange(8), batch)).values
        text = reward._clip.encode_text([f"A photo depicts {t}" for t in texts]).double()
    image = batch.clip_features.double()
    cosine = (text / text.norm(dim=-1, keepdim=True) * image / image.norm(dim=-1, keepdim=True)).sum(-1)
    torch.testing.assert_close(values.double(), 2.5 * cosine.clamp(min=0), rtol=1e-5, atol=1e-6)


def test_cider_reward_scores_against_the_images_references(world_batch) -> None:
    """A caption copied from its image's references scores high; the same caption given to another image
    scores lower; the document frequencies come from the training split."""
    datamodule, batch = world_batch
    reward = CiderReward()
    reward.setup(datamodule.training_data(), {})
    from clipcap.objectives.reward_functions import RolloutCaptions

    own = [refs[0] for refs in batch.references]
    with torch.no_grad():
        matched = reward(RolloutCaptions(own, torch.arange(8), batch)).values
        shifted = reward(RolloutCaptions(own, torch.arange(8).roll(1), batch)).values
    assert (matched > shifted).float().mean() >= 0.75 and matched.mean() > 1.0


def test_cider_reward_refuses_images_without_references(world_batch) -> None:
    datamodule, batch = world_batch
    from dataclasses import replace

    from clipcap.objectives.reward_functions import RolloutCaptions

    reward = CiderReward()
    reward.setup(datamodule.training_data(), {})
    unlabelled = replace(batch, references=[[] for _ in batch.image_ids])
    with pytest.raises(ValueError, match="no reference captions"):
        reward(RolloutCaptions(["a"] * 8, torch.arange(8), unlabelled))
    with pytest.raises(ValueError, match="unlabelled"):
        CiderReward().setup(TrainingData(labelled=False), {})


# ------------------------------------------------------------------------------------ SCST


def test_scst_on_the_tiny_world(world_batch) -> None:
    datamodule, batch = world_batch
    torch.manual_seed(0)
    captioner = tiny_captioner(datamodule.clip_dim, trainable=True).train()
    objective = SCST(rollout=DecodingConfig(do_sample=True, max_new_tokens=10, stop_at_period=True))
    objective.setup(datamodule.training_data())
    output = objective(captioner, batch)
    assert output.terms["captions"] == 40  # 5 samples for each of the 8 images
    assert "greedy_reward" in output.terms and torch.isfinite(output.loss)
    output.loss.backward()
    assert captioner.mapper.net[0].weight.grad is not None
    assert objective.needs_references and not objective.needs_captions


@pytest.mark.parametrize("mode", ["reward", "loss"])
def test_kl_as_reward_shaping_or_as_a_loss_term(mode: str, world_batch) -> None:
    datamodule, batch = world_batch
    outputs = {}
    for beta in (0.0, 0.5):
        torch.manual_seed(0)
        captioner = tiny_captioner(datamodule.clip_dim, trainable=False).train()
        objective = PolicyGradient(
            rewards=[LengthReward()],
            kl_coefficient=beta,
            kl_mode=mode,
            rollout=DecodingConfig(max_new_tokens=8),
        )
        objective.setup(datamodule.training_data())
        outputs[beta] = objective(captioner, batch)
    kl = outputs[0.5].terms["kl"]
    if mode == "reward":
        torch.testing.assert_close(outputs[0.5].terms["reward"], outputs[0.0].terms["reward"] - 0.5 * kl)
    else:
        assert kl > 0  # GRPO's estimator is ≥ 0 and the prefix moves the LM
        torch.testing.assert_close(outputs[0.5].loss, outputs[0.0].loss + 0.5 * kl)
        torch.testing.assert_close(outputs[0.5].terms["reward"], outputs[0.0].terms["reward"])


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: PolicyGradient(rewards=[]), "rewards is empty"),
        (lambda: PolicyGradient(rewards=[CiderReward(weight=float("nan"))]), "weight must be a finite"),
        (lambda: PolicyGradient(rewards=[LengthReward(weight=float("inf"))]), "weight must be a finite"),
        (
            lambda: PolicyGradient(
                rewards=[LengthReward()],
                advantage=LeaveOneOutBaseline(),
                rollout=DecodingConfig(do_sample=True),
            ),
            "samples_per_image ≥ 2",
        ),
        (
            lambda: SCST(advantage=GroupNormalisedAdvantage(), samples_per_image=1),
            "samples_per_image ≥ 2",
        ),
        (lambda: SCST(rollout=DecodingConfig(max_new_tokens=8)), "sampling rollout"),
        (lambda: PolicyGradient(rewards=[LengthReward(), LengthReward()]), "names must differ"),
        (lambda: GroupNormalisedAdvantage(scale="std"), "scale must be one of"),
        (lambda: LeaveOneOutBaseline(samples=1), "at least 2"),
    ],
)
def test_bad_settings_are_refused_when_the_objective_is_built(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_state_of_a_discritune_checkpoint_from_before_the_preset_loads(world_batch) -> None:
    """Checkpoints written before DiscriTune became a preset hold its baseline under ``baseline.``."""
    objective = DiscriTune()
    old = {"baseline.mean": torch.tensor(-2.5, dtype=torch.float64), "baseline.count": torch.tensor(7)}
    objective.load_state_dict(old)
    assert float(objective.baseline.mean) == -2.5 and int(objective.baseline.count) == 7


# ------------------------------------------------------------------------------------ the command line

REPO = Path(__file__).resolve().parents[1]
CE_CONFIG = str(REPO / "lightning_configs" / "synthetic" / "ce.yaml")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.logger=false"]


def test_scst_from_the_command_line_like_discritune(tiny_world: Path, tmp_path: Path) -> None:
    from clipcap.training.cli import lightning_cli

    cli = lightning_cli(
        ["fit", "--config", CE_CONFIG, "--model.objective=SCST", "--trainer.max_epochs=1",
         "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--data.init_args.batch_size=4",
         "--trainer.default_root_dir", str(tmp_path), *QUIET]
    )  # fmt: skip
    objective = cli.model.objective
    assert isinstance(objective, SCST) and objective.samples_per_image == 5
    assert isinstance(objective.advantage, SelfCriticalBaseline)
    assert [type(r) for r in objective.rewards] == [CiderReward]
    assert cli.trainer.global_step == 2 and int(cli.model.skipped_steps) == 0
    assert "train/greedy_reward" in cli.trainer.callback_metrics


@pytest.mark.parametrize("config", ["scst_cider", "scst_clip_s", "discritune_grpo", "cider_retrieval"])
def test_the_shipped_reward_configs_run(config: str, tiny_world: Path, tmp_path: Path) -> None:
    from clipcap.training.cli import lightning_cli

    cli = lightning_cli(
        ["fit", "--config", str(REPO / "lightning_configs" / "synthetic" / f"{config}.yaml"),
         "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0",
         "--data.init_args.batch_size=4", "--model.objective.init_args.rollout.max_new_tokens=6",
         "--trainer.default_root_dir", str(tmp_path), *QUIET]
    )  # fmt: skip
    assert cli.trainer.global_step == 1 and int(cli.model.skipped_steps) == 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rewards: []", "rewards is empty"),
        (
            "rewards:\n  - class_path: clipcap.objectives.CiderReward\n    init_args:\n      weight: .nan",
            "weight",
        ),
        ("samples_per_image: 1\nadvantage: clipcap.objectives.LeaveOneOutBaseline", "samples_per_image ≥ 2"),
    ],
)
def test_bad_objective_settings_stop_the_command_before_any_model_loads(
    override: str, message: str, tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The message names the option; no captioner, LM or CLIP is built."""
    import textwrap

    from clipcap.commands import main
    from clipcap.lm import PrefixLM

    config = tmp_path / "objective.yaml"
    body = textwrap.indent(override, " " * 6)
    config.write_text(
        f"model:\n  objective:\n    class_path: clipcap.objectives.SCST\n    init_args:\n{body}\n"
    )
    loaded = []
    monkeypatch.setattr(PrefixLM, "__init__", lambda *a, **k: loaded.append(a) or pytest.fail("an LM loaded"))
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                CE_CONFIG,
                "--config",
                str(config),
                "--trainer.default_root_dir",
                str(tmp_path),
            ]
        )
    assert exit_info.value.code != 0 and not loaded


def test_cider_on_unlabelled_training_data_stops_the_command(
    tiny_world: Path, tmp_path: Path, capsys
) -> None:
    from clipcap.commands import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", CE_CONFIG, "--model.objective=SCST", "--data.init_args.unlabelled=true",
              "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "CiderReward" in err and "data.init_args.unlabelled" in err


def test_scst_under_two_process_ddp(tiny_world: Path, tmp_path: Path) -> None:
    """2 CPU processes (gloo), 4 images each, 5 samples per image: the SCST preset fits and logs."""
    run_two_processes(
        ["fit", "--config", CE_CONFIG, "--model.objective=SCST",
         "--model.objective.init_args.rollout.max_new_tokens=8", "--trainer.max_epochs=1",
         "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=1",
         "--data.init_args.batch_size=4", "--trainer.default_root_dir", str(tmp_path)],
        tiny_world,
    )  # fmt: skip
    rows = csv_rows(tmp_path)
    captions = {float(row["train/captions_step"]) for row in rows if row.get("train/captions_step")}
    assert captions == {20.0}  # each rank's 4 images × 5 samples
    assert any(row.get("train/greedy_reward_step") for row in rows)


@pytest.mark.parametrize(("objective", "sampled"), [("DiscriTune", False), ("SCST", True)])
def test_one_rollout_option_on_the_command_line_keeps_the_presets_other_settings(
    objective: str, sampled: bool, tiny_world: Path
) -> None:
    """``rollout.max_new_tokens=12`` changes that field only: the preset still stops after "." and SCST
    still samples (a ``None`` default would have rebuilt the rollout from DecodingConfig's defaults)."""
    from clipcap.training.cli import lightning_cli

    cli = lightning_cli(
        ["fit", "--config", CE_CONFIG, f"--model.objective={objective}",
         "--model.objective.init_args.rollout.max_new_tokens=12", *QUIET],
        run=False,
    )  # fmt: skip
    rollout = cli.model.objective.rollout
    assert rollout.max_new_tokens == 12 and rollout.stop_at_period and rollout.do_sample == sampled


def test_the_token_normalisation_is_self_critical_codes_loss(
    world_batch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SCST's loss as self-critical.pytorch's RewardCriterion computes it, on constructed captions (ended by
    EOS, by ".", cut by the cap, empty): ``Σ_i −A_i · Σ_t log π_it / Σ_i n_i``, the EOS that ended a caption
    counted among its tokens, A the reward minus the image's greedy caption's reward."""
    datamodule, batch = world_batch
    torch.manual_seed(0)
    captioner = tiny_captioner(datamodule.clip_dim, trainable=True).eval()
    period = captioner.lm.period_token_ids[0]
    eos = captioner.lm.eos_token_id
    a, b, c, d = [t for t in range(100, 400) if t not in captioner.lm.period_token_ids][:4]
    images = batch.clip_features[:2]
    small = type(batch)(image_ids=batch.image_ids[:2], clip_features=images, references=batch.references[:2])
    sampled = [[a, b], [a, b, c, period], [a, b, c, d, a, b], []]  # image 0: EOS, "."; image 1: cap, EOS
    greedy = [[a], [c, d, a]]

    def generate_ids(features, rollout, keep_mode=False):
        return sampled if rollout.do_sample else greedy

    monkeypatch.setattr(captioner, "generate_ids", generate_ids)
    objective = SCST(
        rewards=[LengthReward()],
        rollout=DecodingConfig(do_sample=True, max_new_tokens=6, stop_at_period=True),
        samples_per_image=2,
    )
    objective.setup(datamodule.training_data())
    output = objective(captioner, small)

    words = lambda ids: len(captioner.tokenizer.decode(ids, skip_special_tokens=True).split())  # noqa: E731
    rewards = torch.tensor([-float(words(ids)) for ids in sampled])
    baseline = torch.tensor([-float(words(ids)) for ids in greedy]).repeat_interleave(2)
    advantages = rewards - baseline
    scored = [[a, b, eos], [a, b, c, period], [a, b, c, d, a, b], [eos]]  # what each caption chose
    total, count = torch.zeros(()), 0
    for index, ids in enumerate(scored):
        tokens = type(objective)._caption_tokens(captioner, [ids])[0]
        logits = captioner(images[index // 2 : index // 2 + 1], tokens).logits
        log_probs = logits.float().log_softmax(-1)[0, torch.arange(len(ids)), torch.tensor(ids)]
        total = total - advantages[index] * log_probs.sum()
        count += len(ids)
    torch.testing.assert_close(output.loss, total / count, rtol=1e-5, atol=1e-6)
