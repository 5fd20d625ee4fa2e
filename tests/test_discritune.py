"""DiscriTune: reward, log-probability and baseline maths by hand, gradient direction, the objective on
the tiny world, skipped non-finite steps, and the baseline in checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from clipcap.compat import enable_activation_checkpointing
from clipcap.data.batch import collate_caption_batch
from clipcap.generation import DecodingConfig
from clipcap.objectives import (
    CumulativeMeanBaseline,
    DiscriTune,
    LeaveOneOutBaseline,
    MovingAverageBaseline,
    SelfCriticalBaseline,
)
from clipcap.objectives.rewards import (
    caption_log_probs,
    cosine_reward,
    discriminative_reward,
    discriminative_reward_with_negatives,
    egg_caption_log_probs,
    egg_row_lengths,
    hard_negative_indices,
    reinforce_loss,
)
from clipcap.training import CaptionModule, SyntheticCaptions
from clipcap.training.cli import lightning_cli
from clipcap.training.data import CaptionImages
from tiny_models import tiny_captioner
from two_processes import csv_rows, run_two_processes

REPO = Path(__file__).resolve().parents[1]
CE_CONFIG = str(REPO / "lightning_configs" / "synthetic" / "ce.yaml")
DT_CONFIG = str(REPO / "lightning_configs" / "synthetic" / "discritune.yaml")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.logger=false"]


def test_discriminative_reward_by_hand() -> None:
    texts = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # norms differ: the reward uses cosines
    images = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    targets = torch.tensor([0, 2])
    scale = 10.0
    cos = [[1.0, 1 / math.sqrt(2), 0.0], [0.0, 1 / math.sqrt(2), 1.0]]
    expected = []
    for row, target in zip(cos, targets.tolist(), strict=True):
        logits = [scale * value for value in row]
        expected.append(logits[target] - math.log(sum(math.exp(v) for v in logits)))
    rewards = discriminative_reward(texts, images, targets, scale)
    torch.testing.assert_close(rewards, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cosine_reward(texts, images, targets), torch.tensor([1.0, 1.0]))


def test_reinforce_loss_and_baselines_by_hand() -> None:
    """The baselines of the loss −R (DiscriTune's convention; their updates take the rewards)."""
    rewards = torch.tensor([-0.5, -2.0])
    log_probs = torch.tensor([-1.0, -3.0])
    baseline = CumulativeMeanBaseline()
    losses = -rewards
    first = baseline.loss_baseline(losses, 1, None)
    torch.testing.assert_close(first, torch.zeros(2))  # no past batch yet
    torch.testing.assert_close(
        reinforce_loss(rewards, first, log_probs), torch.tensor([0.5 * -1.0, 2.0 * -3.0])
    )
    baseline.update(rewards)  # batch mean loss 1.25
    baseline.update(torch.tensor([-0.25, -0.25]))
    b = (1.25 + 0.25) / 2
    assert baseline.loss_baseline(losses, 1, None)[0].item() == pytest.approx(b)
    torch.testing.assert_close(
        reinforce_loss(rewards, baseline.loss_baseline(losses, 1, None), log_probs),
        torch.tensor([(0.5 - b) * -1.0, (2.0 - b) * -3.0]),
    )
    # The advantage is R minus the reward-space baseline −b, and −A · log π is DiscriTune's loss.
    estimate = baseline(rewards, 1)
    torch.testing.assert_close(estimate.advantages, rewards + b)
    torch.testing.assert_close(
        -estimate.advantages * log_probs, reinforce_loss(rewards, estimate.baseline, log_probs)
    )
    average = MovingAverageBaseline(decay=0.5)
    average.update(torch.tensor([-2.0]))
    average.update(torch.tensor([-4.0]))
    assert average.loss_baseline(torch.zeros(1), 1, None).item() == pytest.approx(0.5 * 2.0 + 0.5 * 4.0)


def test_hard_negatives_skip_the_image_itself_near_duplicates_and_the_batch() -> None:
    # Unit vectors at these angles; cos(Δ) ≥ 0.95 (Δ < 0.318) makes a near-duplicate.
    angles = torch.tensor([0.0, 0.05, 0.35, 0.6, 0.9, 1.2, 0.45])
    bank = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    queries = bank[[0, 6]]
    exclude = torch.tensor([[0, 6], [0, 6]])  # each query's own row and the rest of the batch
    indices = hard_negative_indices(queries, bank, exclude, count=2, duplicate_threshold=0.95)
    assert indices[0].tolist() == [2, 3]  # not 0 (itself), not 1 (near-duplicate), not 6 (in the batch)
    assert indices[1].tolist() == [1, 4]  # rows 2 and 3 are near-duplicates of row 6; 0 is in the batch
    assert not (indices == 0).any() and not (indices == 6).any()
    with pytest.raises(ValueError, match="fewer than 6"):
        hard_negative_indices(queries, bank, exclude, count=6, duplicate_threshold=0.95)


def test_reward_with_shared_negatives_equals_the_reward_over_all_candidates() -> None:
    torch.manual_seed(0)
    texts, images, negatives = torch.randn(3, 8), torch.randn(3, 8), torch.randn(2, 8)
    targets = torch.arange(3)
    with_negatives = discriminative_reward_with_negatives(
        texts, images, targets, negatives.expand(3, -1, -1), logit_scale=20.0
    )
    everything = discriminative_reward(texts, torch.cat([images, negatives]), targets, logit_scale=20.0)
    torch.testing.assert_close(with_negatives, everything)


def test_leave_one_out_and_self_critical_baselines_by_hand() -> None:
    losses = torch.tensor([1.0, 2.0, 6.0, 4.0, 4.0, 1.0])  # 2 images × 3 samples, image-major
    torch.testing.assert_close(
        LeaveOneOutBaseline(samples=3).loss_baseline(losses, 3, None),
        torch.tensor([4.0, 3.5, 1.5, 2.5, 2.5, 4.0]),
    )
    greedy = torch.tensor([3.0, 3.0, 3.0, 2.0, 2.0, 2.0])
    torch.testing.assert_close(SelfCriticalBaseline().loss_baseline(losses, 3, greedy), greedy)
    with pytest.raises(ValueError, match="samples"):
        LeaveOneOutBaseline(samples=1)
    with pytest.raises(ValueError, match="do_sample"):
        DiscriTune(baseline=LeaveOneOutBaseline(samples=2))
    with pytest.raises(ValueError, match="do_sample"):
        DiscriTune(baseline=SelfCriticalBaseline())


def test_caption_log_probs_exclude_the_stop_and_divide_by_length() -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]] * 2))
    tokens = torch.tensor([[0, 1, 2], [2, 0, 0]])
    lengths = torch.tensor([2, 0])  # caption 0: tokens 0, 1 then the stop; caption 1 stopped at once
    values = caption_log_probs(logits, tokens, lengths)
    torch.testing.assert_close(values[0], torch.tensor((math.log(0.5) + math.log(0.8)) / 2))
    torch.testing.assert_close(values[1], torch.tensor(math.log(0.25)))  # the stop token's own


def egg_reference_loss(
    captioner, features: torch.Tensor, caption_ids: list[list[int]], max_new_tokens: int, text_embeds, scale
) -> torch.Tensor:
    """The loss of one DiscriTune step as EGG's emergent_captioner computes it (written from
    ``ClipCapModel.forward``, ``discriminative_loss`` and ``ReinforceCaptionGame.forward``, first batch: the
    mean baseline is 0). ``generate`` returns each caption followed by EOS while there is room, the rows
    padded with EOS (GPT-2's pad id there) to the longest; one unmasked teacher-forced pass scores them."""
    eos = captioner.lm.eos_token_id
    rows = [ids + [eos] if len(ids) < max_new_tokens else list(ids) for ids in caption_ids]
    width = max(len(row) for row in rows)
    indices = torch.tensor([row + [eos] * (width - len(row)) for row in rows])
    prompts = captioner.prefix(features)
    suffix = captioner.lm.model.get_input_embeddings()(indices)
    logits = captioner.lm.model(inputs_embeds=torch.cat([prompts, suffix], dim=1)).logits
    log_softmax = logits[:, prompts.shape[1] - 1 : -1].float().log_softmax(-1)
    extra_tokens = (indices == eos).cumsum(dim=1) > 0
    msg_lengths = (width - extra_tokens.sum(dim=1) + 1).clamp(max=width)
    token_log_probs = log_softmax.gather(2, indices[:, :, None]).squeeze(2) * (~extra_tokens).float()
    log_probs = token_log_probs.sum(1) / msg_lengths
    receiver_output = (
        scale
        * torch.nn.functional.normalize(text_embeds, dim=-1)
        @ torch.nn.functional.normalize(features, dim=-1).T
    )
    loss = torch.nn.functional.cross_entropy(receiver_output, torch.arange(len(rows)), reduction="none")
    baseline = 0.0
    return ((loss.detach() - baseline) * log_probs).mean()


def test_the_faithful_loss_and_gradient_are_eggs(world_batch, monkeypatch: pytest.MonkeyPatch) -> None:
    """On constructed captions: stopped by ".", stopped at once by EOS, cut by the length cap, ended by EOS,
    a lone "." -- the loss and every gradient equal EGG's computation."""
    datamodule, batch = world_batch
    torch.manual_seed(0)
    captioner = tiny_captioner(datamodule.clip_dim, trainable=True).eval()  # no dropout: one network
    period = captioner.lm.period_token_ids[0]
    words = [t for t in range(100, 400) if t not in captioner.lm.period_token_ids][:6]
    a, b, c, d, e, f = words
    captions = [[a, b, period], [], [a, b, c, d, e, f], [a, b], [period], [c], [d, e, f, period], [b, a]]
    monkeypatch.setattr(captioner, "generate_ids", lambda features, rollout, keep_mode=False: captions)
    objective = DiscriTune(rollout=DecodingConfig(max_new_tokens=6, stop_at_period=True))
    objective.setup(datamodule.training_data())
    output = objective(captioner, batch)
    output.loss.backward()
    ours = {name: p.grad.clone() for name, p in captioner.named_parameters() if p.grad is not None}
    captioner.zero_grad()

    texts = DiscriTune._texts(captioner, captions)
    with torch.no_grad():
        text_embeds = objective.receiver.encode_text(texts)
    expected = egg_reference_loss(
        captioner, batch.clip_features, captions, 6, text_embeds, objective.receiver.logit_scale
    )
    expected.backward()
    torch.testing.assert_close(output.loss, expected, rtol=1e-6, atol=1e-7)
    theirs = {name: p.grad for name, p in captioner.named_parameters() if p.grad is not None}
    assert ours.keys() == theirs.keys() and len(ours) > 2
    for name, gradient in ours.items():
        torch.testing.assert_close(gradient, theirs[name], rtol=1e-5, atol=1e-8, msg=name)
    # The "mean" normalisation is another objective: a different loss on the same captions.
    mean = DiscriTune(rollout=objective.rollout, log_prob_normalisation="mean")
    mean.setup(datamodule.training_data())
    assert not torch.allclose(mean(captioner, batch).loss, expected)


def test_egg_log_probs_by_hand() -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]] * 3))
    tokens = torch.tensor([[0, 1, 2], [2, 0, 0], [1, 1, 1]])
    lengths = torch.tensor([2, 0, 3])  # stopped after 2 tokens; stopped at once; cut by a cap of 3
    rows = egg_row_lengths(lengths, torch.tensor([True, True, False]), max_new_tokens=3)
    assert rows.tolist() == [3, 1, 3]  # an EOS follows the stopped ones; T = 3
    values = egg_caption_log_probs(logits, tokens, lengths, rows)
    torch.testing.assert_close(values[0], torch.tensor((math.log(0.5) + math.log(0.8)) / 3))  # min(2+1, 3)
    assert values[1] == 0.0  # no token before its EOS: log π = 0
    torch.testing.assert_close(values[2], torch.tensor((math.log(0.25) + math.log(0.8) + math.log(0.2)) / 3))
    # A shorter batch: T = 2 caps the first caption's divisor at 2.
    short = egg_caption_log_probs(logits, tokens, lengths, torch.tensor([2, 1, 2]))
    torch.testing.assert_close(short[0], torch.tensor((math.log(0.5) + math.log(0.8)) / 2))


def test_training_captions_are_decoded_with_dropout_on(world_batch, monkeypatch: pytest.MonkeyPatch) -> None:
    """EGG's sender decodes in the LM's training mode; rollout_dropout=False decodes in eval mode."""
    datamodule, batch = world_batch
    captioner = tiny_captioner(datamodule.clip_dim, trainable=True).train()
    modes: list[bool] = []
    original = type(captioner).generate_ids

    def spy(self, features, rollout=None, keep_mode=False):
        ids = original(self, features, rollout, keep_mode=keep_mode)
        modes.append(self.lm.model.training if keep_mode else False)
        return ids

    monkeypatch.setattr(type(captioner), "generate_ids", spy)
    for dropout in (True, False):
        objective = DiscriTune(
            rollout=DecodingConfig(max_new_tokens=6, stop_at_period=True), rollout_dropout=dropout
        )
        objective.setup(datamodule.training_data())
        objective(captioner, batch)
    assert modes == [True, False]
    assert captioner.training  # the module's mode is left as it was
    for module in captioner.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    torch.manual_seed(0)
    with_dropout = [
        original(captioner, batch.clip_features, DecodingConfig(max_new_tokens=8), keep_mode=True)
        for _ in range(2)
    ]
    assert with_dropout[0] != with_dropout[1]  # dropout is on while decoding: two rollouts differ


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_the_gradient_follows_the_advantage(advantage: float, tiny_world: Path) -> None:
    torch.manual_seed(0)
    captioner = tiny_captioner(clip_dim=8)
    features = torch.randn(2, 8)
    tokens, lengths = DiscriTune._caption_tokens(captioner, [[5, 9, 12], [7]])
    optimizer = torch.optim.SGD(captioner.parameters(), lr=0.05)

    def log_pi() -> torch.Tensor:
        return caption_log_probs(captioner(features, tokens).logits, tokens.input_ids, lengths)

    before = log_pi().detach()
    rewards = torch.full((2,), advantage)  # −R − b = −advantage with b = 0
    loss = reinforce_loss(rewards, torch.zeros(()), log_pi()).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    after = log_pi().detach()
    assert ((after - before) * advantage > 0).all(), (before, after)


@pytest.fixture(scope="module")
def world_batch(tiny_world: Path):
    datamodule = SyntheticCaptions(world_dir=str(tiny_world), clip_model="synthetic:clip")
    images = CaptionImages(datamodule.split("train"))
    return datamodule, collate_caption_batch([images[i] for i in range(8)])


def test_objective_on_the_tiny_world(world_batch) -> None:
    datamodule, batch = world_batch
    torch.manual_seed(0)
    captioner = tiny_captioner(datamodule.clip_dim, trainable=True)
    objective = DiscriTune()
    objective.setup(datamodule.training_data())
    output = objective(captioner, batch)
    assert torch.isfinite(output.loss) and output.loss.requires_grad
    assert output.terms["reward"] <= 0 and 0 <= output.terms["batch_p_at_1"] <= 1
    assert output.terms["baseline"] == 0  # the first batch sees no past
    assert int(objective.baseline.count) == 1
    objective.eval()
    objective(captioner, batch)
    assert int(objective.baseline.count) == 1, "validation must not move the baseline"
    assert "receiver" not in dict(objective.named_modules()) and not any(
        "receiver" in key or "text_model" in key for key in objective.state_dict()
    ), "the frozen receiver must not be saved with the objective"


@pytest.mark.parametrize("baseline", [LeaveOneOutBaseline(samples=3), SelfCriticalBaseline()])
def test_sampling_baselines_on_the_tiny_world(baseline, world_batch) -> None:
    datamodule, batch = world_batch
    torch.manual_seed(0)
    captioner = tiny_captioner(datamodule.clip_dim, trainable=True)
    objective = DiscriTune(rollout=DecodingConfig(do_sample=True, max_new_tokens=12), baseline=baseline)
    objective.setup(datamodule.training_data())
    output = objective(captioner, batch)
    assert torch.isfinite(output.loss) and output.loss.requires_grad
    output.loss.backward()
    assert captioner.mapper.net[0].weight.grad is not None
    if isinstance(baseline, LeaveOneOutBaseline):
        assert output.terms["captions"] == 24  # 3 sampled captions for each of the 8 images


@pytest.mark.parametrize("trainable", [False, True])
def test_kl_shaping_subtracts_beta_times_kl_from_the_reward(trainable: bool, world_batch) -> None:
    datamodule, batch = world_batch
    outputs = {}
    for beta in (0.0, 0.5):
        torch.manual_seed(0)
        captioner = tiny_captioner(datamodule.clip_dim, trainable=trainable)
        objective = DiscriTune(kl_coefficient=beta)
        objective.setup(datamodule.training_data())
        outputs[beta] = objective(captioner, batch)
    kl = outputs[0.5].terms["kl"]
    assert "kl" not in outputs[0.0].terms
    torch.testing.assert_close(outputs[0.5].terms["reward"], outputs[0.0].terms["reward"] - 0.5 * kl)
    assert kl.abs() > 0  # the prefix changes the LM's predictions
    with pytest.raises(ValueError, match="kl_coefficient"):
        DiscriTune(kl_coefficient=-1.0)


def test_hard_negatives_lower_the_reward_of_the_same_captions(world_batch) -> None:
    datamodule, batch = world_batch
    rewards = {}
    for count in (0, 4):
        torch.manual_seed(0)
        captioner = tiny_captioner(datamodule.clip_dim, trainable=True)
        objective = DiscriTune(hard_negatives=count)
        objective.setup(datamodule.training_data())
        rewards[count] = objective(captioner, batch).terms["reward"]
    assert rewards[4] < rewards[0]  # the same greedy captions now compete against 4 more images each
    with pytest.raises(ValueError, match="discriminative"):
        DiscriTune(hard_negatives=2, discriminative=False)


def test_non_finite_rewards_skip_the_step(world_batch, monkeypatch: pytest.MonkeyPatch) -> None:
    datamodule, batch = world_batch
    captioner = tiny_captioner(datamodule.clip_dim, trainable=True)
    objective = DiscriTune()
    objective.setup(datamodule.training_data())
    monkeypatch.setattr(
        objective.receiver,
        "encode_text",
        lambda texts: torch.full((len(texts), datamodule.clip_dim), float("nan")),
    )
    output = objective(captioner, batch)
    assert output.skip and "non-finite reward" in output.skip_reason
    assert int(objective.baseline.count) == 0, "a skipped step must not move the baseline"


@pytest.fixture(scope="module")
def ce_run(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory):
    """A cross-entropy run of a few steps on the tiny world: (its CLI, its last checkpoint)."""
    cli = lightning_cli(
        ["fit", "--config", CE_CONFIG, "--trainer.default_root_dir", str(tmp_path_factory.mktemp("ce")),
         "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", *QUIET]
    )  # fmt: skip
    return cli, cli.trainer.checkpoint_callback.last_model_path


def test_the_discritune_config_starts_from_a_cross_entropy_checkpoint(ce_run, tmp_path: Path) -> None:
    _, ce_checkpoint = ce_run
    cli = lightning_cli(
        ["fit", "--config", DT_CONFIG, f"--model.init_from={ce_checkpoint}", "--trainer.fast_dev_run=true",
         "--trainer.default_root_dir", str(tmp_path), "--data.init_args.batch_size=8", *QUIET]
    )  # fmt: skip
    assert cli.trainer.state.finished and isinstance(cli.model.objective, DiscriTune)
    assert torch.isfinite(cli.trainer.callback_metrics["train/reward"])


def test_switching_a_cross_entropy_config_to_discritune(ce_run, tmp_path: Path) -> None:
    _, ce_checkpoint = ce_run
    cli = lightning_cli(
        ["fit", "--config", CE_CONFIG, "--model.objective=DiscriTune", f"--model.init_from={ce_checkpoint}",
         "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs=1",
         "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1", "--data.init_args.batch_size=8", *QUIET]
    )  # fmt: skip
    objective = cli.model.objective
    assert isinstance(objective, DiscriTune) and int(objective.baseline.count) == 3
    assert len(cli.trainer.train_dataloader.dataset) == len(cli.datamodule.split("train").images)  # images
    path = cli.trainer.checkpoint_callback.last_model_path
    reloaded = CaptionModule.load_from_checkpoint(path, map_location="cpu", weights_only=False)
    assert isinstance(reloaded.objective, DiscriTune)
    assert int(reloaded.objective.baseline.count) == 3
    assert reloaded.objective.baseline.mean.item() == pytest.approx(objective.baseline.mean.item())
    assert reloaded.objective.baseline.mean.item() > 0  # −R > 0: rewards are log-probabilities


def test_init_from_copies_the_captioner_only(ce_run) -> None:
    ce, path = ce_run
    clip_dim = ce.model.captioner.clip_dim
    module = CaptionModule(tiny_captioner(clip_dim, prefix_length=8), DiscriTune(), init_from=path)
    trained = ce.model.captioner.state_dict()
    for key, value in module.captioner.state_dict().items():
        torch.testing.assert_close(value, trained[key].cpu(), msg=key)
    with pytest.raises(ValueError, match="init_from"):
        CaptionModule(tiny_captioner(clip_dim, prefix_length=3), DiscriTune(), init_from=path)


@pytest.mark.parametrize("global_distractors", [True, False])
def test_global_distractors_under_two_process_ddp(
    global_distractors: bool, tiny_world: Path, tmp_path: Path
) -> None:
    """2 CPU processes (gloo), 4 images each: with global distractors each caption competes against 8."""
    run_two_processes(
        ["fit", "--config", CE_CONFIG, "--model.objective=DiscriTune",
         f"--model.objective.global_distractors={str(global_distractors).lower()}", "--trainer.max_epochs=1",
         "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=1",
         "--data.init_args.batch_size=4", "--trainer.default_root_dir", str(tmp_path)],
        tiny_world,
    )  # fmt: skip
    rows = csv_rows(tmp_path)
    candidates = {float(row["train/candidates_step"]) for row in rows if row.get("train/candidates_step")}
    assert candidates == ({8.0} if global_distractors else {4.0})


@pytest.fixture(scope="module")
def other_receiver(world_batch, tmp_path_factory: pytest.TempPathFactory):
    """A second CLIP (another architecture and embedding size) with its own caches of the tiny world."""
    from clipcap.commands.features import main as features_main
    from tiny_models import tiny_clip_model

    root = tmp_path_factory.mktemp("receiver")
    clip_dir = root / "clip"
    tiny_clip_model(seed=7).save_pretrained(clip_dir)
    datamodule, _ = world_batch
    features_main(
        ["--config", DT_CONFIG, "--splits", "train,val", "--no_progress",
         f"--data.init_args.world_dir={datamodule.world_dir}", f"--data.init_args.clip_model={clip_dir}",
         f"--data.init_args.features_dir={root / 'features'}"]
    )  # fmt: skip
    return str(clip_dir), str(root / "features")


def test_a_receiver_clip_other_than_the_features_clip(world_batch, other_receiver) -> None:
    datamodule, batch = world_batch
    clip_dir, features_dir = other_receiver
    torch.manual_seed(0)
    captioner = tiny_captioner(datamodule.clip_dim).eval()  # eval: the rollout and the check decode alike
    objective = DiscriTune(receiver_clip=clip_dir, receiver_features_dir=features_dir, hard_negatives=2)
    objective.setup(datamodule.training_data())
    receiver = objective.receiver
    assert receiver.dim == 16 != datamodule.clip_dim  # the captioner still reads the data's features
    output = objective(captioner, batch)
    # By hand: the same greedy captions, read by the other CLIP, against its cached image embeddings.
    texts = objective._texts(captioner, captioner.generate_ids(batch.clip_features, objective.rollout))
    retrieval = objective.retrieval  # the preset's RetrievalReward holds the receiver's caches and bank
    cache = retrieval.__dict__["_receiver_caches"]["train"]
    images = torch.stack([torch.from_numpy(cache.get(i)) for i in batch.image_ids])
    negatives = retrieval._hard_negatives(images, batch.image_ids)
    expected = discriminative_reward_with_negatives(
        receiver.encode_text(texts), images, torch.arange(len(texts)), negatives, receiver.logit_scale
    )
    torch.testing.assert_close(output.terms["reward"], expected.mean())
    assert retrieval.__dict__["_bank"].shape[1] == 16  # hard negatives come from the receiver's cache


def test_a_receiver_clip_without_its_own_features_is_refused(world_batch, other_receiver) -> None:
    datamodule, _ = world_batch
    clip_dir, _ = other_receiver
    with pytest.raises(ValueError, match="receiver_features_dir"):
        DiscriTune(receiver_clip=clip_dir).setup(datamodule.training_data())
    # The data's own caches were made with the data's CLIP, not the receiver: refused, naming the field.
    with pytest.raises(ValueError, match="clip"):
        DiscriTune(receiver_clip=clip_dir, receiver_features_dir=str(datamodule.features_dir)).setup(
            datamodule.training_data()
        )
    with pytest.raises(ValueError, match="receiver_features_dir is set"):
        DiscriTune(receiver_features_dir=str(datamodule.features_dir)).setup(datamodule.training_data())


def test_resumed_training_continues_as_if_never_stopped(ce_run, tmp_path: Path) -> None:
    """Two epochs in one go equal one epoch, a stop, and a resume from its checkpoint: weights, optimizer
    moments, the baseline and the data order (dropout and shuffling draw from the restored RNG)."""
    _, ce_checkpoint = ce_run
    common = ["fit", "--config", DT_CONFIG, f"--model.init_from={ce_checkpoint}", "--data.init_args.batch_size=8",
              "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=0", "--seed_everything=3", *QUIET]  # fmt: skip
    straight = lightning_cli(
        [*common, "--trainer.max_epochs=2", "--trainer.default_root_dir", str(tmp_path / "a")]
    )
    first = lightning_cli(
        [*common, "--trainer.max_epochs=1", "--trainer.default_root_dir", str(tmp_path / "b")]
    )
    resumed = lightning_cli(
        [*common, "--trainer.max_epochs=2", "--trainer.default_root_dir", str(tmp_path / "c"),
         "--ckpt_path", first.trainer.checkpoint_callback.last_model_path]
    )  # fmt: skip
    assert resumed.trainer.global_step == straight.trainer.global_step == 6
    for name in ("count", "mean"):
        torch.testing.assert_close(
            getattr(resumed.model.objective.baseline, name), getattr(straight.model.objective.baseline, name)
        )
    expected = straight.model.state_dict()
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
    moments = [s["exp_avg"] for s in straight.trainer.optimizers[0].state.values()]
    resumed_moments = [s["exp_avg"] for s in resumed.trainer.optimizers[0].state.values()]
    for got, want in zip(resumed_moments, moments, strict=True):
        torch.testing.assert_close(got, want)


def _without_dropout(captioner):
    for module in captioner.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return captioner


@pytest.mark.parametrize(
    "rollout, baseline",
    [
        (DecodingConfig(max_new_tokens=12, stop_at_period=True), None),  # the paper's: greedy, stop at "."
        (DecodingConfig(do_sample=True, max_new_tokens=12), LeaveOneOutBaseline(samples=3)),
    ],
)
@pytest.mark.parametrize("trainable", [True, False])
def test_log_probs_from_the_rollout_equal_the_teacher_forced_pass_without_dropout(
    rollout: DecodingConfig, baseline, trainable: bool, world_batch
) -> None:
    """``log_probs_from_rollout`` reads log π from the rollout's own logits (decoded with gradients)
    instead of a second, teacher-forced pass. Without dropout both see the same network: the same captions,
    log π, loss and gradients, for greedy captions stopped at "." or at EOS, and for k samples per image."""
    datamodule, batch = world_batch
    results = []
    for from_rollout in (False, True):
        torch.manual_seed(0)
        captioner = _without_dropout(tiny_captioner(datamodule.clip_dim, trainable=trainable)).train()
        objective = DiscriTune(
            rollout=rollout,
            baseline=baseline if baseline is None else LeaveOneOutBaseline(samples=3),
            log_probs_from_rollout=from_rollout,
        )
        objective.setup(datamodule.training_data())
        torch.manual_seed(1)
        output = objective(captioner, batch)
        output.loss.backward()
        grads = [p.grad.clone() for p in captioner.parameters() if p.requires_grad]
        results.append((output, grads))
    (teacher, teacher_grads), (fused, fused_grads) = results
    assert fused.terms["caption_tokens"] == teacher.terms["caption_tokens"]
    torch.testing.assert_close(fused.terms["reward"], teacher.terms["reward"])
    torch.testing.assert_close(fused.terms["log_prob"], teacher.terms["log_prob"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.loss, teacher.loss, rtol=1e-5, atol=1e-6)
    assert len(fused_grads) == len(teacher_grads) > (2 if trainable else 0)
    for a, b in zip(fused_grads, teacher_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_log_probs_from_the_rollout_refuse_gradient_checkpointing(world_batch) -> None:
    datamodule, batch = world_batch
    captioner = tiny_captioner(datamodule.clip_dim, trainable=True).train()
    enable_activation_checkpointing(captioner.lm.model, use_reentrant=False)
    objective = DiscriTune(log_probs_from_rollout=True)
    objective.setup(datamodule.training_data())
    with pytest.raises(ValueError, match="gradient checkpointing"):
        objective(captioner, batch)
