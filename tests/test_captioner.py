"""The core captioner: mappers, loss masking, frozen LMs, and decoding against reference decoders."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks.naive_decoders import naive_greedy
from clipcap.captioner import ClipCaptioner
from clipcap.data.batch import CaptionBatch
from clipcap.generation import DecodingConfig, cut_at_stop, stop_token_ids
from clipcap.lm import PrefixLM
from clipcap.mapper import FusedAttentionEncoderLayer, MLPMapper, TransformerMapper
from clipcap.objectives import CrossEntropy

CLIP_DIM = 16


def make_captioner(folder: Path, trainable: bool = True, mapper=None) -> ClipCaptioner:
    torch.manual_seed(0)
    mapper = mapper or functools.partial(MLPMapper, prefix_length=4)
    return ClipCaptioner(
        PrefixLM(str(folder), trainable=trainable), mapper, clip_dim=CLIP_DIM, max_caption_tokens=20
    )


def test_mlp_mapper_shapes_and_hidden_width() -> None:
    mapper = MLPMapper(clip_dim=16, lm_dim=8, prefix_length=5)
    assert mapper(torch.randn(3, 16)).shape == (3, 5, 8)
    assert mapper.net[0].out_features == 5 * 8 // 2  # ClipCap's P·D/2
    with pytest.raises(ValueError, match="pooled"):
        mapper(torch.randn(3, 2, 16))


def test_transformer_mapper_takes_pooled_and_grid_features() -> None:
    mapper = TransformerMapper(
        clip_dim=16, lm_dim=8, prefix_length=3, clip_length=5, num_layers=2, num_heads=2
    )
    assert mapper(torch.randn(2, 16)).shape == (2, 3, 8)
    assert mapper(torch.randn(2, 7, 16)).shape == (2, 3, 8)
    with pytest.raises(ValueError, match="num_heads"):
        TransformerMapper(clip_dim=16, lm_dim=8, num_heads=3)


def test_transformer_mapper_fused_attention_equals_torch_layers() -> None:
    """With gradients the mapper's layers run a packed Q/K/V product and SDPA; outputs and gradients equal
    ``nn.TransformerEncoderLayer``'s own forward on the same weights, pooled and grid, train and eval."""
    torch.manual_seed(0)
    fused = TransformerMapper(
        clip_dim=16, lm_dim=12, prefix_length=3, clip_length=5, num_layers=2, num_heads=3
    )
    with torch.no_grad():  # LayerNorms away from (1, 0), so that a swapped or skipped norm would show
        for name, parameter in fused.named_parameters():
            if "norm" in name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    plain = copy.deepcopy(fused)
    for layer in plain.transformer.layers:
        layer.__class__ = nn.TransformerEncoderLayer
    assert all(type(layer) is FusedAttentionEncoderLayer for layer in fused.transformer.layers)
    for features in (torch.randn(4, 16), torch.randn(4, 7, 16)):
        for training in (True, False):
            outputs, gradients = [], []
            for mapper in (fused, plain):
                mapper.train(training)
                mapper.zero_grad()
                output = mapper(features)
                (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum().backward()
                outputs.append(output)
                gradients.append([p.grad for p in mapper.parameters()])  # None: unused (pooled or grid)
            torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=1e-5)
            for fused_grad, plain_grad in zip(*gradients, strict=True):
                if plain_grad is None:
                    assert fused_grad is None
                else:
                    torch.testing.assert_close(fused_grad, plain_grad, atol=1e-6, rtol=1e-5)
    assert set(fused.state_dict()) == set(plain.state_dict())


def test_targets_end_with_eos_and_padding_is_found_by_length(gpt2_folder: Path) -> None:
    captioner = make_captioner(gpt2_folder)
    eos = captioner.lm.eos_token_id
    assert captioner.lm.pad_token_id == eos  # GPT-2 style: padding reuses EOS, so ids cannot tell them apart
    tokens = captioner.encode_captions(["look, a red star!", "a circle"])
    bang = captioner.tokenizer.encode("!", add_special_tokens=False)
    for row, caption in enumerate(["look, a red star!", "a circle"]):
        ids = captioner.tokenizer.encode(caption, add_special_tokens=False)
        n = len(ids) + 1
        assert tokens.labels[row, :n].tolist() == ids + [eos]  # every token counts, EOS included
        assert (tokens.labels[row, n:] == -100).all()
        assert (tokens.input_ids[row, n:] == eos).all()  # padding shares the EOS id ...
    assert bang[0] in tokens.labels[0].tolist()  # ... and a real "!" is a target
    # EOS as a *real* target is counted even though padding uses the same id.
    assert (tokens.labels == eos).sum() == 2


def test_long_captions_are_cut_to_the_cap_and_keep_eos(gpt2_folder: Path) -> None:
    captioner = make_captioner(gpt2_folder)
    tokens = captioner.encode_captions(
        ["a red circle and a blue square and a green star on the left " * 5, "a"]
    )
    assert tokens.input_ids.shape[1] == captioner.max_caption_tokens
    assert tokens.labels[0, -1] == captioner.lm.eos_token_id


def test_loss_counts_eos_and_tokens_equal_to_pad_id(gpt2_folder: Path) -> None:
    """The loss equals a hand-computed sum over exactly the real tokens, EOS included."""
    captioner = make_captioner(gpt2_folder).eval()  # no dropout: the two computations must agree
    captions = ["look, a red star!", "a circle"]
    features = torch.randn(2, CLIP_DIM)
    loss = CrossEntropy()(captioner, CaptionBatch(["a", "b"], features, captions)).loss

    prefix = captioner.prefix(features)
    eos = captioner.lm.eos_token_id
    total, count = 0.0, 0
    for row, caption in enumerate(captions):
        ids = captioner.tokenizer.encode(caption, add_special_tokens=False) + [eos]
        embeds = torch.cat([prefix[row : row + 1], captioner.lm.embed(torch.tensor([ids]))], dim=1)
        logprobs = captioner.lm(embeds)[0].log_softmax(-1)
        p = prefix.shape[1]
        for t, token in enumerate(ids):
            total -= float(logprobs[p - 1 + t, token])
            count += 1
    torch.testing.assert_close(loss, torch.tensor(total / count), rtol=1e-4, atol=1e-5)


def test_label_smoothing_changes_the_loss(gpt2_folder: Path) -> None:
    captioner = make_captioner(gpt2_folder)
    batch = CaptionBatch(["a"], torch.randn(1, CLIP_DIM), ["a red circle."])
    plain = CrossEntropy()(captioner, batch).loss
    smoothed = CrossEntropy(label_smoothing=0.2)(captioner, batch).loss
    assert not torch.allclose(plain, smoothed)
    with pytest.raises(ValueError, match="label_smoothing"):
        CrossEntropy(label_smoothing=1.0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_frozen_lm_gets_no_gradients_but_the_mapper_does(
    arch: str, gpt2_folder: Path, llama_folder: Path
) -> None:
    captioner = make_captioner(gpt2_folder if arch == "gpt2" else llama_folder, trainable=False)
    captioner.train()
    assert not captioner.lm.model.training  # a frozen LM stays in eval mode (no dropout)
    batch = CaptionBatch(["a", "b"], torch.randn(2, CLIP_DIM), ["a red circle.", "two shapes!"])
    CrossEntropy()(captioner, batch).loss.backward()
    assert all(p.grad is None for p in captioner.lm.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in captioner.mapper.parameters())


def test_trainable_lm_gets_gradients(gpt2_folder: Path) -> None:
    captioner = make_captioner(gpt2_folder, trainable=True)
    batch = CaptionBatch(["a"], torch.randn(1, CLIP_DIM), ["a red circle."])
    CrossEntropy()(captioner, batch).loss.backward()
    assert captioner.lm.model.get_input_embeddings().weight.grad is not None


def test_a_trained_lm_trains_with_dropout_from_the_first_step(gpt2_folder: Path, tmp_path: Path) -> None:
    """from_pretrained hands back a model in eval mode and Lightning keeps each submodule's mode, so a
    trained LM that did not switch itself to training mode would be finetuned without its dropout."""
    captioner = make_captioner(gpt2_folder, trainable=True)  # never told .train(), as under Lightning
    assert captioner.lm.model.training and captioner.lm.model.config.resid_pdrop > 0
    embeds = torch.randn(1, 4, captioner.lm.embed_dim)
    assert not torch.equal(captioner.lm(embeds), captioner.lm(embeds))  # dropout is active
    captioner.eval()
    torch.testing.assert_close(captioner.lm(embeds), captioner.lm(embeds))


def test_gpt2_python_gelu_is_replaced_by_the_fused_kernel_with_the_same_outputs(gpt2_folder: Path) -> None:
    """GPT-2's ``gelu_new`` is seven Python elementwise ops; PrefixLM swaps in ``F.gelu(approximate="tanh")``,
    the same function in one kernel, and leaves the config (what is saved and exported) as it was."""
    from transformers import AutoModelForCausalLM
    from transformers.activations import GELUTanh, NewGELUActivation

    lm = PrefixLM(str(gpt2_folder), trainable=True).eval()
    activations = [m for m in lm.model.modules() if isinstance(m, (GELUTanh, NewGELUActivation))]
    assert activations and all(type(m) is GELUTanh for m in activations)
    assert lm.model.config.activation_function == "gelu_new"
    original = AutoModelForCausalLM.from_pretrained(gpt2_folder).eval()
    assert any(type(m) is NewGELUActivation for m in original.modules())
    embeds = torch.randn(3, 7, lm.embed_dim)
    torch.testing.assert_close(lm(embeds), original(inputs_embeds=embeds).logits, rtol=1e-5, atol=1e-5)


def test_features_of_the_wrong_size_are_refused(gpt2_folder: Path) -> None:
    captioner = make_captioner(gpt2_folder)
    with pytest.raises(ValueError, match="clip_dim=16"):
        captioner.prefix(torch.randn(2, CLIP_DIM + 1))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_generate_equals_a_hand_rolled_loop(arch: str, gpt2_folder: Path, llama_folder: Path) -> None:
    captioner = make_captioner(gpt2_folder if arch == "gpt2" else llama_folder).eval()
    features = torch.randn(5, CLIP_DIM)
    decoding = DecodingConfig(max_new_tokens=10)
    stops = stop_token_ids(captioner.lm, stop_at_period=False)
    expected = cut_at_stop(
        torch.tensor(
            [
                row + [stops[0]] * (10 - len(row))
                for row in naive_greedy(captioner.lm, captioner.prefix(features), 10, stops)
            ]
        ),
        captioner.lm.eos_token_id,
        stops,
    )
    assert captioner.generate_ids(features, decoding) == expected


def test_batched_beam_search_equals_per_image_beam_search(gpt2_folder: Path) -> None:
    captioner = make_captioner(gpt2_folder)
    features = torch.randn(6, CLIP_DIM)
    decoding = DecodingConfig(num_beams=4, num_return_sequences=2, max_new_tokens=9)
    batched = captioner.generate_ids(features, decoding)
    one_by_one = [ids for row in features.split(1) for ids in captioner.generate_ids(row, decoding)]
    assert batched == one_by_one
    assert len(batched) == 12


def test_stop_at_period_keeps_the_period_and_drops_eos(gpt2_folder: Path) -> None:
    captioner = make_captioner(gpt2_folder)
    period = captioner.lm.period_token_ids
    assert period and all("." in captioner.tokenizer.decode([i]) for i in period)
    eos = captioner.lm.eos_token_id
    rows = torch.tensor([[5, period[0], 7, eos], [5, 6, eos, eos], [5, 6, 7, 8]])
    stops = [eos, *period]
    assert cut_at_stop(rows, eos, stops) == [[5, period[0]], [5, 6], [5, 6, 7, 8]]
    assert cut_at_stop(rows, eos, [eos]) == [[5, period[0], 7], [5, 6], [5, 6, 7, 8]]


def test_sampling_gives_several_captions_and_is_seeded(gpt2_folder: Path) -> None:
    captioner = make_captioner(gpt2_folder)
    features = torch.randn(2, CLIP_DIM)
    decoding = DecodingConfig(
        do_sample=True, top_k=20, top_p=0.9, temperature=1.5, num_return_sequences=3, max_new_tokens=6
    )
    torch.manual_seed(1)
    first = captioner.generate(features, decoding)
    torch.manual_seed(1)
    second = captioner.generate(features, decoding)
    assert first == second
    assert len(first) == 2 and all(len(texts) == 3 for texts in first)
    assert len({text for texts in first for text in texts}) > 1


def test_decoding_config_rejects_impossible_settings() -> None:
    with pytest.raises(ValueError, match="num_return_sequences"):
        DecodingConfig(num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError):
        DecodingConfig(max_new_tokens=0)


def test_ignore_stops_decodes_exactly_max_new_tokens_with_stops_as_ordinary_tokens(gpt2_folder: Path) -> None:
    """Benchmarks time decoding at a fixed length: every caption runs max_new_tokens steps, and greedy
    decoding is then the naive decoder with no stop ids (EOS may be chosen like any other token)."""
    captioner = make_captioner(gpt2_folder).eval()
    features = torch.randn(4, CLIP_DIM)
    greedy = captioner.generate_ids(features, DecodingConfig(max_new_tokens=12, ignore_stops=True))
    with torch.no_grad():
        expected = naive_greedy(captioner.lm, captioner.prefix(features), 12, stop_ids=[])
    assert greedy == expected and all(len(ids) == 12 for ids in greedy)
    beams = captioner.generate_ids(
        features, DecodingConfig(num_beams=3, max_new_tokens=12, ignore_stops=True)
    )
    assert [len(ids) for ids in beams] == [12] * 4
    assert DecodingConfig(ignore_stops=True).stop_ids(captioner.lm) == []


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_beams_and_samples_share_one_prefix_pass_with_unchanged_captions(
    arch: str, gpt2_folder: Path, llama_folder: Path
) -> None:
    """The prefix runs once per image and its cache is repeated per beam (or sample); the captions equal
    those of ``generate`` running the prefix once per beam."""
    captioner = make_captioner(gpt2_folder if arch == "gpt2" else llama_folder).eval()
    features = torch.randn(3, CLIP_DIM)
    for decoding in (
        DecodingConfig(num_beams=4, num_return_sequences=2, max_new_tokens=9),
        DecodingConfig(do_sample=True, num_return_sequences=3, max_new_tokens=9),
    ):
        prefix = captioner.prefix(features)
        assert captioner._starting_cache(prefix, torch.ones(prefix.shape[:2]), decoding) is not None
        torch.manual_seed(1)
        shared = captioner.generate_ids(features, decoding)
        stops = decoding.stop_ids(captioner.lm)
        torch.manual_seed(1)
        with torch.no_grad():
            plain = captioner.lm.model.generate(
                inputs_embeds=prefix,
                attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
                generation_config=decoding.generation_config(stops, captioner.lm.pad_token_id),
            )
        assert shared == cut_at_stop(plain, captioner.lm.eos_token_id, stops)


def test_compiled_teacher_forcing_equals_eager_and_keeps_the_weights_where_they_are(
    gpt2_folder: Path,
) -> None:
    """``PrefixLM(compile=...)`` runs the teacher-forced pass through torch.compile (here with the
    ``aot_eager`` backend: dynamo's graph capture and AOT autograd, without inductor's C++ build): the same
    logits and gradients as eager for two caption lengths, the same state-dict keys, the same captions."""
    eager = make_captioner(gpt2_folder).eval()
    torch.manual_seed(0)
    compiled = ClipCaptioner(
        PrefixLM(str(gpt2_folder), trainable=True, compile={"backend": "aot_eager", "dynamic": True}),
        functools.partial(MLPMapper, prefix_length=4),
        clip_dim=CLIP_DIM,
        max_caption_tokens=20,
    ).eval()
    compiled.load_state_dict(eager.state_dict())
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    features = torch.randn(3, CLIP_DIM)
    for captions in (["a red circle."] * 3, ["a small blue square on the left of a big green one"] * 3):
        batch = CaptionBatch(["a", "b", "c"], features, captions)
        losses = [CrossEntropy()(model, batch).loss for model in (eager, compiled)]
        torch.testing.assert_close(losses[1], losses[0])
        grads = [
            torch.autograd.grad(loss, model.mapper.parameters())
            for loss, model in zip(losses, (eager, compiled), strict=True)
        ]
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(b, a)
    decoding = DecodingConfig(max_new_tokens=8, num_beams=2)
    assert compiled.generate_ids(features, decoding) == eager.generate_ids(features, decoding)
    with pytest.raises(ValueError, match="compile must be"):
        PrefixLM(str(gpt2_folder), compile="yes")


def first_positions_fed(captioner: ClipCaptioner, run) -> list[torch.Tensor]:
    """The embedding at position 0 of every call ``run()`` makes to the Hugging Face model that starts a
    sequence (calls that continue one from a KV cache are left out)."""
    seen: list[torch.Tensor] = []

    def record(module, args, kwargs) -> None:
        embeds = kwargs.get("inputs_embeds")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if embeds is not None and (cache is None or cache.get_seq_length() == 0):
            seen.append(embeds[:, 0].detach().clone())

    handle = captioner.lm.base_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_llama_sequences_start_with_bos_everywhere_and_gpt2_ones_do_not(
    gpt2_folder: Path, llama_folder: Path
) -> None:
    """LLaMA's tokenizer starts every text with <s>, so the captioner puts it before the prefix: teacher
    forcing, greedy and beam decoding, the Gumbel rollout and DiscriTune's KL reference all start from it.
    GPT-2's adds nothing (as ClipCap); ``bos`` overrides the convention."""
    from clipcap.gumbel import GumbelRollout, gumbel_rollout
    from clipcap.objectives.reference import start_token_id

    llama = make_captioner(llama_folder)
    bos_id = llama.lm.tokenizer.bos_token_id
    assert llama.lm.tokenizer("a red circle").input_ids[0] == bos_id == llama.bos_token_id
    bos = llama.lm.embed(torch.tensor([bos_id]))[0].detach()
    features = torch.randn(2, 16)
    assert llama.prefix(features).shape[1] == llama.prefix_length + 1
    tokens = llama.encode_captions(["a red circle.", "a blue square."])
    runs = {
        "teacher forcing": lambda: llama(features, tokens),
        "greedy": lambda: llama.generate_ids(features, DecodingConfig(max_new_tokens=4)),
        "beam": lambda: llama.generate_ids(features, DecodingConfig(num_beams=3, max_new_tokens=4)),
        "gumbel": lambda: gumbel_rollout(llama, features, GumbelRollout(max_new_tokens=3)),
    }
    for name, run in runs.items():
        firsts = first_positions_fed(llama, run)
        assert firsts, name
        for first in firsts:
            torch.testing.assert_close(first, bos.expand_as(first), msg=name)
    assert start_token_id(llama.lm) == bos_id  # the un-prefixed KL reference starts from <s> too

    gpt2 = make_captioner(gpt2_folder)
    assert gpt2.bos_token_id is None and gpt2.prefix(features).shape[1] == gpt2.prefix_length
    without = ClipCaptioner(llama.lm, functools.partial(MLPMapper, prefix_length=3), clip_dim=16, bos=False)
    assert without.prefix(features).shape[1] == 3
    forced = ClipCaptioner(gpt2.lm, functools.partial(MLPMapper, prefix_length=3), clip_dim=16, bos=True)
    assert forced.bos_token_id == gpt2.lm.tokenizer.bos_token_id and forced.prefix(features).shape[1] == 4


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("trainable", [False, True])
def test_logits_for_the_kept_positions_equal_the_full_logits(
    arch: str, trainable: bool, gpt2_folder: Path, llama_folder: Path
) -> None:
    """PrefixLM passes the kept positions as a tensor (a contiguous gather, one matrix product for the head):
    the logits and the gradients equal those of the full pass cut afterwards."""
    torch.manual_seed(0)
    lm = PrefixLM(str(gpt2_folder if arch == "gpt2" else llama_folder), trainable=trainable).eval()
    embeds = torch.randn(3, 9, lm.model.get_input_embeddings().weight.shape[1], requires_grad=True)
    mask = torch.ones(3, 9, dtype=torch.long)
    kept = lm(embeds, mask, logits_to_keep=4)
    (kept.square().sum()).backward()
    gradient = embeds.grad.clone()
    embeds.grad = None
    full = lm(embeds, mask)[:, -4:]
    (full.square().sum()).backward()
    assert kept.shape == (3, 4, full.shape[-1])
    torch.testing.assert_close(kept, full)
    torch.testing.assert_close(gradient, embeds.grad)
    assert kept.is_contiguous()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_teacher_forcing_leaves_out_the_last_caption_token_without_changing_a_logit(
    arch: str, gpt2_folder: Path, llama_folder: Path
) -> None:
    """The teacher-forced pass does not feed the captions' last token (it predicts nothing): its logits and
    the mapper's gradients equal those of the whole prefix + caption run through the LM and cut to the
    positions that predict caption tokens, with captions of different lengths (padding) in the batch."""
    captioner = make_captioner(gpt2_folder if arch == "gpt2" else llama_folder).eval()
    features = torch.randn(3, CLIP_DIM)
    tokens = captioner.encode_captions(["a red circle on the left.", "a star", "two small squares, grey"])
    teacher = captioner(features, tokens)
    teacher.logits.square().sum().backward()
    gradient = captioner.mapper.net[0].weight.grad.clone()
    captioner.zero_grad()

    prefix = captioner.prefix(features)
    embeds = torch.cat([prefix, captioner.lm.embed(tokens.input_ids)], dim=1)
    mask = torch.cat([tokens.attention_mask.new_ones(prefix.shape[:2]), tokens.attention_mask], dim=1)
    length = tokens.input_ids.shape[1]
    full = captioner.lm(embeds, mask)[:, prefix.shape[1] - 1 : prefix.shape[1] - 1 + length]
    full.square().sum().backward()
    assert teacher.logits.shape == full.shape and teacher.logits.is_contiguous()
    torch.testing.assert_close(teacher.logits, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gradient, captioner.mapper.net[0].weight.grad, atol=1e-5, rtol=1e-4)
