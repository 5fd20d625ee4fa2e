"""The Gumbel-softmax rollout: KV cache against the full re-run, checkpointed steps against plain ones,
straight-through samples, stop handling, gradients, temperatures and seeding, on tiny GPT-2 and LLaMA."""

from __future__ import annotations

import functools
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from clipcap.captioner import ClipCaptioner
from clipcap.generation import stop_token_ids
from clipcap.gumbel import GumbelRollout, SoftCaption, gumbel_rollout, gumbel_softmax_sample
from clipcap.lm import PrefixLM
from clipcap.mapper import MLPMapper

CLIP_DIM = 16
BATCH = 3
ARCHS = ["gpt2", "llama"]


def make_captioner(folder: Path, trainable: bool = True, **lm_options) -> ClipCaptioner:
    torch.manual_seed(0)
    return ClipCaptioner(
        PrefixLM(str(folder), trainable=trainable, **lm_options),
        functools.partial(MLPMapper, prefix_length=3),
        clip_dim=CLIP_DIM,
    )


def clip_features(seed: int = 0) -> torch.Tensor:
    return torch.randn(BATCH, CLIP_DIM, generator=torch.Generator().manual_seed(seed))


def rollout(captioner: ClipCaptioner, seed: int = 1, **options) -> SoftCaption:
    options.setdefault("max_new_tokens", 6)
    return gumbel_rollout(
        captioner, clip_features(), GumbelRollout(**options), generator=torch.Generator().manual_seed(seed)
    )


def sharpen(captioner: ClipCaptioner, factor: float = 30.0) -> None:
    """Scales the LM's logits: a tiny random LM's are nearly flat, so its samples would be the noise's."""
    captioner.lm.model.get_output_embeddings().register_forward_hook(lambda module, args, out: out * factor)


@contextmanager
def forced_tokens(captioner: ClipCaptioner, plan: dict[int, dict[int, int]], stop_at_period: bool):
    """Makes the LM emit ``plan[step][row]`` at those steps and never a stop token otherwise.

    Counts LM-head calls, one per rollout step with a KV cache; yields the list of calls made.
    """
    stops = stop_token_ids(captioner.lm, stop_at_period)
    calls: list[int] = []

    def hook(module, args, output: torch.Tensor) -> torch.Tensor:
        step = len(calls)
        calls.append(step)
        bias = torch.zeros(output.shape[0], output.shape[-1])
        bias[:, stops] = -1e4
        for row, token in plan.get(step, {}).items():
            bias[row, token] = 1e4
        return output + bias[:, None]

    handle = captioner.lm.model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def gradients(captioner: ClipCaptioner) -> dict[str, torch.Tensor | None]:
    return {name: None if p.grad is None else p.grad.clone() for name, p in captioner.named_parameters()}


def weights_loss(weights: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """A scalar function of (B, L, V) sample vectors: a fixed random projection of them, squared."""
    projection = torch.randn(weights.shape[-1], 4, generator=torch.Generator().manual_seed(seed))
    return (weights @ projection).square().sum()


@pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cached_rollout_equals_the_full_rerun(folders: dict[str, Path], arch: str, hard: bool) -> None:
    captioner = make_captioner(folders[arch]).eval()
    sharpen(captioner)
    with torch.no_grad():
        cached = rollout(captioner, hard=hard, use_cache=True)
        full = rollout(captioner, hard=hard, use_cache=False)
        noise_only = rollout(make_captioner(folders[arch]).eval(), hard=hard)
    assert cached.token_ids.shape == (BATCH, 6)
    assert torch.equal(cached.token_ids, full.token_ids)
    assert not torch.equal(cached.token_ids, noise_only.token_ids)  # the ids do depend on the logits
    # Float32 sums in another order, through logits sharpened × 30: tolerances of about 1e-6 relative.
    torch.testing.assert_close(cached.logits, full.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached.weights, full.weights, rtol=1e-4, atol=1e-5)
    assert torch.equal(cached.lengths, full.lengths) and torch.equal(cached.mask, full.mask)


def reference_rollout(
    captioner: ClipCaptioner, steps: int, temperature: float, hard: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rollout written out plainly: the whole sequence re-run each step, no stops.

    Returns (weights, logits), each (B, L, V).
    """
    generator = torch.Generator().manual_seed(seed)
    embeddings = captioner.lm.model.get_input_embeddings().weight
    sequence = captioner.prefix(clip_features())
    weights, all_logits = [], []
    for _ in range(steps):
        logits = captioner.lm(sequence)[:, -1].float()
        uniform = torch.rand(logits.shape, generator=generator).clamp_min(torch.finfo(torch.float32).tiny)
        noise = -(-uniform.log()).log()
        soft = torch.softmax((logits + noise) / temperature, dim=-1)
        sample = soft
        if hard:
            one_hot = torch.nn.functional.one_hot((logits + noise).argmax(-1), logits.shape[-1]).float()
            sample = one_hot + soft - soft.detach()
        weights.append(sample)
        all_logits.append(logits)
        sequence = torch.cat([sequence, (sample @ embeddings)[:, None]], dim=1)
    return torch.stack(weights, dim=1), torch.stack(all_logits, dim=1)


@pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
@pytest.mark.parametrize("arch", ARCHS)
def test_rollout_matches_a_plain_reference_in_values_and_gradients(
    folders: dict[str, Path], arch: str, hard: bool
) -> None:
    captioner = make_captioner(folders[arch]).eval()
    sharpen(captioner, 10.0)
    results = []
    with forced_tokens(captioner, {}, stop_at_period=False):  # no stops: the reference has none
        for run in ("rollout", "reference"):
            captioner.zero_grad(set_to_none=True)
            if run == "rollout":
                caption = rollout(captioner, hard=hard, temperature=0.7)
                weights, logits = caption.weights, caption.logits
            else:
                weights, logits = reference_rollout(captioner, 6, temperature=0.7, hard=hard, seed=1)
            loss = weights_loss(weights) + logits.logsumexp(-1).sum() * 0.1
            loss.backward()
            results.append((weights.detach(), logits.detach(), gradients(captioner)))
    (weights, logits, grads), (reference_weights, reference_logits, reference_grads) = results
    torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights, reference_weights, rtol=1e-5, atol=1e-6)
    for name, grad in reference_grads.items():
        assert grad is not None and grads[name] is not None, name
        scale = grad.abs().max().item()  # sums in another order: float32 rounding relative to the largest
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize(
    ("arch", "use_cache", "trainable"),
    [
        ("gpt2", True, True),
        ("gpt2", False, True),
        ("llama", True, True),
        ("llama", False, True),
        ("gpt2", True, False),
    ],
    ids=["gpt2-cache", "gpt2-no-cache", "llama-cache", "llama-no-cache", "gpt2-cache-frozen"],
)
def test_checkpointed_steps_give_the_same_outputs_and_gradients(
    folders: dict[str, Path], arch: str, use_cache: bool, trainable: bool
) -> None:
    # Training mode: GPT-2's dropout is on (when trainable), so its masks must be replayed in backward.
    captioner = make_captioner(folders[arch], trainable=trainable).train()
    results = {}
    for checkpoint_steps in (False, True):
        captioner.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        caption = rollout(captioner, use_cache=use_cache, checkpoint_steps=checkpoint_steps)
        mask = caption.mask.unsqueeze(-1)
        loss = weights_loss(caption.weights) + (caption.logits.log_softmax(-1) * mask).sum() * 0.1
        loss.backward()
        results[checkpoint_steps] = caption, gradients(captioner)
    (plain, plain_grads), (checkpointed, checkpointed_grads) = results[False], results[True]
    assert torch.equal(plain.token_ids, checkpointed.token_ids)
    torch.testing.assert_close(plain.logits, checkpointed.logits, rtol=0, atol=0)
    torch.testing.assert_close(plain.weights, checkpointed.weights, rtol=0, atol=0)
    assert plain_grads.keys() == checkpointed_grads.keys()
    for name, grad in plain_grads.items():
        if name.startswith("lm.") and not trainable:
            assert grad is None and checkpointed_grads[name] is None, name
            continue
        assert grad is not None and checkpointed_grads[name] is not None, name
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_hard_samples_are_one_hot_ids_and_soft_samples_are_distributions(
    folders: dict[str, Path], arch: str
) -> None:
    captioner = make_captioner(folders[arch]).eval()
    sharpen(captioner, 5.0)
    with forced_tokens(captioner, {2: {0: captioner.lm.eos_token_id}}, stop_at_period=False):
        hard = rollout(captioner, hard=True)
    with forced_tokens(captioner, {2: {0: captioner.lm.eos_token_id}}, stop_at_period=False):
        soft = rollout(captioner, hard=False, temperature=2.0)
    vocab = hard.weights.shape[-1]
    alive = torch.ones(BATCH, 6, dtype=torch.bool)
    alive[0, 3:] = False  # row 0 stops at step 2
    one_hot = torch.nn.functional.one_hot(hard.token_ids, vocab).float()
    assert torch.equal(hard.weights[alive], one_hot[alive])  # exactly, not to a tolerance
    assert torch.equal(hard.weights[~alive], torch.zeros_like(hard.weights[~alive]))
    assert hard.weights.requires_grad  # the straight-through part is there, though it adds zero

    rows = soft.weights[alive]
    torch.testing.assert_close(rows.sum(-1), torch.ones(len(rows)), rtol=0, atol=1e-5)
    caption_rows = soft.weights[soft.mask.bool()]  # the forced stop is near one-hot: leave it out
    assert caption_rows.max() < 0.5 and ((caption_rows > 0).sum(-1) > vocab // 2).all()
    assert torch.equal(rows.argmax(-1), soft.token_ids[alive])
    assert torch.equal(soft.weights[~alive], torch.zeros_like(soft.weights[~alive]))


def test_straight_through_gradient_is_the_softmax_gradient() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 11, generator=generator)
    noise = -torch.empty(4, 11).exponential_(generator=generator).log()
    projection = torch.randn(11, 3, generator=generator)
    results = {}
    for hard in (True, False):
        leaf = logits.clone().requires_grad_()
        sample = gumbel_softmax_sample(leaf, noise, temperature=0.7, hard=hard)
        (sample @ projection).square().sum().backward()
        results[hard] = sample.detach(), leaf.grad
    soft = torch.softmax((logits + noise) / 0.7, dim=-1)
    torch.testing.assert_close(results[False][0], soft)
    expected_one_hot = torch.nn.functional.one_hot((logits + noise).argmax(-1), 11).float()
    assert torch.equal(results[True][0], expected_one_hot)
    # Straight-through: the one-hot forward value enters the loss, the softmax's Jacobian carries it back.
    leaf = logits.clone().requires_grad_()
    soft_sample = torch.softmax((leaf + noise) / 0.7, dim=-1)
    (soft_sample * (2 * (expected_one_hot @ projection) @ projection.T)).sum().backward()
    torch.testing.assert_close(results[True][1], leaf.grad)
    assert not torch.allclose(results[True][1], results[False][1])


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_stop_at_their_first_stop_token(folders: dict[str, Path], arch: str) -> None:
    captioner = make_captioner(folders[arch]).eval()
    eos, pad = captioner.lm.eos_token_id, captioner.lm.pad_token_id
    plan = {0: {1: eos}, 2: {0: eos}, 4: {0: eos, 1: 7}}  # row 0 stops at 2 (and again at 4), row 1 at 0
    with forced_tokens(captioner, plan, stop_at_period=False), torch.no_grad():
        caption = rollout(captioner)
    assert caption.lengths.tolist() == [2, 0, 6]  # the stop itself is not counted; row 2 never stops
    assert caption.mask.tolist() == [[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert caption.token_ids[0, 2] == eos and caption.token_ids[1, 0] == eos
    assert (caption.token_ids[0, 3:] == pad).all() and (caption.token_ids[1, 1:] == pad).all()
    assert (caption.token_ids[2] != eos).all()
    assert caption.weights[0, 2, eos] == 1 and caption.weights[1, 0, eos] == 1  # the stop's sample is kept
    assert (caption.weights[0, 3:] == 0).all() and (caption.weights[1, 1:] == 0).all()
    assert caption.logits.shape == (BATCH, 6, caption.weights.shape[-1])


def test_the_rollout_ends_when_every_row_has_stopped(folders: dict[str, Path]) -> None:
    captioner = make_captioner(folders["gpt2"]).eval()
    eos = captioner.lm.eos_token_id
    plan = {1: {0: eos, 2: eos}, 3: {1: eos}}
    with forced_tokens(captioner, plan, stop_at_period=False) as calls, torch.no_grad():
        caption = rollout(captioner, max_new_tokens=10)
    assert len(calls) == 4  # one LM call per step, none after the last row stopped
    assert caption.token_ids.shape == (BATCH, 4) and caption.weights.shape[:2] == (BATCH, 4)
    assert caption.lengths.tolist() == [1, 3, 1]


def test_a_period_stops_only_with_stop_at_period(folders: dict[str, Path]) -> None:
    captioner = make_captioner(folders["gpt2"]).eval()
    period = captioner.lm.period_token_ids[0]
    lengths = {}
    for stop_at_period in (False, True):
        with forced_tokens(captioner, {1: {0: period}}, stop_at_period) as calls, torch.no_grad():
            caption = rollout(captioner, stop_at_period=stop_at_period)
        assert caption.token_ids[0, 1] == period and len(calls) == 6
        lengths[stop_at_period] = caption.lengths.tolist()
    assert lengths == {False: [6, 6, 6], True: [1, 6, 6]}


@pytest.mark.parametrize("trainable", [True, False], ids=["trainable", "frozen"])
@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_of_the_weights_reach_the_mapper_and_a_trainable_lm(
    folders: dict[str, Path], arch: str, trainable: bool
) -> None:
    captioner = make_captioner(folders[arch], trainable=trainable).train()
    weights_loss(rollout(captioner).weights).backward()
    for name, parameter in captioner.mapper.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    lm_grads = {name: p.grad for name, p in captioner.lm.named_parameters()}
    if not trainable:
        assert all(grad is None for grad in lm_grads.values())
        return
    embeddings = captioner.lm.model.get_input_embeddings().weight
    first_layer = [name for name in lm_grads if ".0." in name]  # the first block: reached through logits
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0  # through y_t @ E
    for name in first_layer:
        grad = lm_grads[name]
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_temperature_must_be_positive(folders: dict[str, Path]) -> None:
    for temperature in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            GumbelRollout(temperature=temperature)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GumbelRollout(max_new_tokens=0)
    captioner = make_captioner(folders["gpt2"])
    with pytest.raises(ValueError, match="temperature"):
        gumbel_rollout(captioner, clip_features(), GumbelRollout(), temperature=0.0)


def test_noise_and_temperature_come_from_the_generator_and_the_override(folders: dict[str, Path]) -> None:
    captioner = make_captioner(folders["llama"]).eval()
    rng_state = torch.get_rng_state()
    with torch.no_grad():
        first = gumbel_rollout(
            captioner,
            clip_features(),
            GumbelRollout(max_new_tokens=4, hard=False, temperature=3.0),
            temperature=0.5,
            generator=torch.Generator().manual_seed(9),
        )
        again = rollout(captioner, seed=9, max_new_tokens=4, hard=False, temperature=0.5)
        other = rollout(captioner, seed=10, max_new_tokens=4, hard=False, temperature=0.5)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG was not touched
    assert torch.equal(first.weights, again.weights) and not torch.equal(first.token_ids, other.token_ids)
    # The first step's Gumbel noise, drawn as the rollout draws it: -log(-log U).
    uniform = torch.rand(BATCH, first.logits.shape[-1], generator=torch.Generator().manual_seed(9))
    noise = -(-uniform.log()).log()
    expected = torch.softmax((first.logits[:, 0] + noise) / 0.5, dim=-1)
    torch.testing.assert_close(first.weights[:, 0], expected)


def test_a_bfloat16_lm_samples_in_float32(folders: dict[str, Path]) -> None:
    captioner = make_captioner(folders["llama"], dtype="bfloat16").eval()
    with torch.no_grad():
        caption = rollout(captioner)
    assert caption.logits.dtype == torch.float32 and caption.weights.dtype == torch.float32
    one_hot = torch.nn.functional.one_hot(caption.token_ids, caption.weights.shape[-1]).float()
    assert torch.equal(caption.weights[0, 0], one_hot[0, 0])


def test_hf_gradient_checkpointing_with_a_cache_is_refused(folders: dict[str, Path]) -> None:
    captioner = make_captioner(folders["gpt2"], gradient_checkpointing=True).train()
    with pytest.raises(ValueError, match="checkpoint_steps"):
        rollout(captioner)
    assert rollout(captioner, use_cache=False).weights.shape[1] == 6
