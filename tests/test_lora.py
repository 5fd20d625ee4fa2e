"""LoRA on the prefix LM: exactly the mapper and the adapters train, checkpoints hold only those, generation
and export work through the adapters, every objective trains LLaMA-with-LoRA, and bad targets are refused."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch
from transformers import GPTNeoConfig, GPTNeoForCausalLM

from clipcap.captioner import CaptionTokens, ClipCaptioner
from clipcap.data.batch import CaptionBatch
from clipcap.export import export_checkpoint, load_exported
from clipcap.generation import DecodingConfig
from clipcap.lm import PrefixLM
from clipcap.lora import LoraSettings, resolve_target_modules
from clipcap.mapper import MLPMapper
from clipcap.objectives import CrossEntropy
from clipcap.objectives.reference import WithoutAdapters
from clipcap.training import CaptionModule
from clipcap.training.cli import lightning_cli
from tiny_models import save_tiny_gpt2, save_tiny_llama

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "lightning_configs" / "synthetic"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.logger=false"]
GREEDY = DecodingConfig(max_new_tokens=8)


@pytest.fixture(scope="module")
def lms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        "gpt2": save_tiny_gpt2(tmp_path_factory.mktemp("gpt2")),
        "llama": save_tiny_llama(tmp_path_factory.mktemp("llama")),
    }


def adapted_captioner(folder: Path, rank: int = 4, seed: int = 0) -> ClipCaptioner:
    torch.manual_seed(seed)
    lm = PrefixLM(str(folder), lora=LoraSettings(rank=rank, dropout=0.0))
    return ClipCaptioner(lm, functools.partial(MLPMapper, prefix_length=3), clip_dim=16)


def perturb_adapters(captioner: ClipCaptioner, seed: int = 1) -> None:
    """LoRA's B starts at zero (the adapted LM equals the base); give it weights, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in captioner.lm.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def lora_parameter_count(family: str, rank: int, hidden: int = 32, layers: int = 2) -> int:
    """r·(in + out) per adapted layer, from the tiny models' shapes (tests/tiny_models.py)."""
    if family == "gpt2":  # c_attn: hidden → 3·hidden
        return layers * rank * (hidden + 3 * hidden)
    head_dim = hidden // 4  # q_proj: hidden → 4 heads, v_proj: hidden → 2 key-value heads
    return layers * rank * ((hidden + 4 * head_dim) + (hidden + 2 * head_dim))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_only_the_mapper_and_the_adapters_train(family: str, lms) -> None:
    captioner = adapted_captioner(lms[family], rank=4)
    trainable = {name: p.numel() for name, p in captioner.named_parameters() if p.requires_grad}
    mapper = sum(p.numel() for p in captioner.mapper.parameters())
    assert sum(trainable.values()) == mapper + lora_parameter_count(family, rank=4)
    assert all(name.startswith("mapper.") or "lora_" in name for name in trainable)


def test_a_step_changes_only_the_mapper_and_the_adapters(lms) -> None:
    captioner = adapted_captioner(lms["llama"]).train()
    before = copy.deepcopy(captioner.state_dict())
    optimizer = torch.optim.Adam([p for p in captioner.parameters() if p.requires_grad], lr=1e-2)
    caption = "a red circle on the left."
    batch = CaptionBatch([str(i) for i in range(4)], torch.randn(4, 16), [caption] * 4, [[caption]] * 4)
    for _ in range(2):  # B is zero at first, so A's gradient is zero until B has moved once
        optimizer.zero_grad()
        CrossEntropy()(captioner, batch).loss.backward()
        optimizer.step()
    changed = {k for k, v in captioner.state_dict().items() if not torch.equal(v, before[k])}
    expected = {k for k in before if k.startswith("mapper.") or "lora_" in k}
    assert changed == expected


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generation_runs_through_the_adapters(family: str, lms) -> None:
    """At initialisation the adapted LM is the base; with trained adapters it is the merged model."""
    captioner = adapted_captioner(lms[family]).eval()
    base = ClipCaptioner(
        PrefixLM(str(lms[family])), functools.partial(MLPMapper, prefix_length=3), clip_dim=16
    )
    base.mapper.load_state_dict(captioner.mapper.state_dict())
    features = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    assert captioner.generate_ids(features, GREEDY) == base.generate_ids(features, GREEDY)
    perturb_adapters(captioner)
    adapted = captioner.generate_ids(features, GREEDY)
    base.lm.model = copy.deepcopy(captioner.lm.model).merge_and_unload()
    assert adapted == base.generate_ids(features, GREEDY)
    # Beam search shares each image's prefix cache among its beams, through the peft wrapper too.
    beams = DecodingConfig(num_beams=3, num_return_sequences=2, max_new_tokens=8)
    assert captioner.generate_ids(features, beams) == base.generate_ids(features, beams)
    with captioner.lm.model.disable_adapter():
        plain = captioner.generate_ids(features, GREEDY)
    assert plain != adapted  # the adapters do change the captions


def test_the_kl_reference_is_the_base_without_adapters(lms) -> None:
    captioner = adapted_captioner(lms["llama"]).eval()
    perturb_adapters(captioner)
    base = PrefixLM(str(lms["llama"]))
    embeds = torch.randn(2, 5, captioner.lm.embed_dim)
    reference = WithoutAdapters(captioner.lm)
    torch.testing.assert_close(reference(embeds), base(embeds))
    assert not torch.allclose(captioner.lm(embeds), base(embeds), atol=1e-4)
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(reference.embed(ids), base.embed(ids))


def fit(config: str, llama: Path, root: Path, *options: str):
    return lightning_cli(
        ["fit", "--config", str(CONFIGS / config), *QUIET,
         f"--model.captioner.init_args.language_model.init_args.pretrained={llama}",
         "--model.captioner.init_args.language_model.init_args.trainable=false",
         "--model.captioner.init_args.language_model.init_args.lora.rank=4",
         "--model.captioner.init_args.mapper.init_args.prefix_length=3",
         "--data.init_args.batch_size=8", "--trainer.limit_val_batches=0", "--trainer.max_epochs=1",
         "--trainer.limit_train_batches=2", "--trainer.default_root_dir", str(root), *options]
    )  # fmt: skip


@pytest.fixture(scope="module")
def lora_run(tiny_world: Path, lms, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("lora_run")
    cli = fit("ce.yaml", lms["llama"], root, "--model.optimizer.init_args.lr=0.05")
    return cli, Path(cli.trainer.checkpoint_callback.last_model_path), root


def test_checkpoints_hold_the_adapters_but_no_base_weights(lora_run) -> None:
    cli, last, _ = lora_run
    state = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    lm_keys = [k for k in state if k.startswith("captioner.lm.")]
    adapter_keys = [k for k in cli.model.state_dict() if "lora_" in k]
    assert sorted(lm_keys) == sorted(adapter_keys) and lm_keys
    reloaded = CaptionModule.load_from_checkpoint(last, map_location="cpu", weights_only=False)
    for key, value in cli.model.captioner.state_dict().items():
        torch.testing.assert_close(reloaded.captioner.state_dict()[key], value, rtol=0, atol=0)


def test_a_resumed_run_continues_from_the_adapters(lora_run) -> None:
    cli, last, root = lora_run
    saved = torch.load(last, map_location="cpu", weights_only=False)
    cli2 = fit("ce.yaml", Path(cli.model.captioner.lm.pretrained), root / "resume",
               "--model.optimizer.init_args.lr=0.05", "--trainer.max_epochs=2", f"--ckpt_path={last}")  # fmt: skip
    assert cli2.trainer.global_step == saved["global_step"] + 2
    adapters = {k: v for k, v in cli2.model.state_dict().items() if "lora_B" in k}
    assert any(not torch.equal(v, saved["state_dict"][k]) for k, v in adapters.items())


def test_export_then_reload_gives_identical_captions(lora_run, tmp_path: Path) -> None:
    cli, last, _ = lora_run
    folder = export_checkpoint(last, tmp_path / "exported", merged=True)
    config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    module = CaptionModule.load_from_checkpoint(last, map_location="cpu", weights_only=False).eval()
    features = torch.randn(4, module.captioner.clip_dim, generator=torch.Generator().manual_seed(0))
    expected = module.captioner.generate(features, GREEDY)
    assert load_exported(folder).generate(features, GREEDY) == expected
    merged = load_exported(folder, merged=True)
    assert merged.lm.lora is None
    assert merged.generate(features, GREEDY) == expected
    with pytest.raises(FileExistsError, match="exists"):
        export_checkpoint(last, folder)


@pytest.mark.parametrize(
    ("config", "options"),
    [
        ("ce.yaml", []),
        ("discritune.yaml", ["--model.optimizer.init_args.lr=0.05", "--model.objective.init_args.rollout.max_new_tokens=6"]),
        ("gumbel_clip.yaml", ["--model.objective.init_args.rollout.max_new_tokens=6",
                              "--data.init_args.labelled_images=8", "--data.init_args.anchor_batch_size=4"]),
    ],
)  # fmt: skip
def test_each_objective_trains_llama_with_lora(
    config: str, options: list[str], tiny_world, lms, tmp_path
) -> None:
    cli = fit(config, lms["llama"], tmp_path, "--trainer.max_epochs=0", *options)
    module = cli.model
    before = {k: v.clone() for k, v in module.captioner.state_dict().items()}
    cli.trainer.fit_loop.max_epochs = 1
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    assert torch.isfinite(torch.tensor(cli.trainer.callback_metrics["train/loss"].item()))
    changed = {k for k, v in module.captioner.state_dict().items() if not torch.equal(v, before[k])}
    assert any("lora_B" in k for k in changed)
    assert all(k.startswith("mapper.") or "lora_" in k for k in changed)


def test_target_modules_that_do_not_exist_are_refused_with_those_that_do(lms) -> None:
    with pytest.raises(ValueError, match=r"\['nope'\] do not exist.*'c_attn', 'c_fc', 'c_proj'"):
        PrefixLM(str(lms["gpt2"]), lora=LoraSettings(target_modules=["nope"]))


def test_a_family_without_defaults_needs_its_targets_named() -> None:
    model = GPTNeoForCausalLM(
        GPTNeoConfig(
            vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, attention_types=[[["global"], 2]]
        )
    )
    with pytest.raises(ValueError, match=r"no default LoRA targets for model type 'gpt_neo'.*'q_proj'"):
        resolve_target_modules(model, LoraSettings(), "tiny-neo")
    assert resolve_target_modules(model, LoraSettings(target_modules=["q_proj", "v_proj"]), "x") == [
        "q_proj",
        "v_proj",
    ]


def test_conflicting_or_unavailable_options_are_refused(lms) -> None:
    with pytest.raises(ValueError, match="choose one"):
        PrefixLM(str(lms["gpt2"]), trainable=True, lora=LoraSettings())
    with pytest.raises(ValueError, match="rank must be"):
        LoraSettings(rank=0)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs bitsandbytes"):
            PrefixLM(str(lms["gpt2"]), lora=LoraSettings(), quantization="8bit")


def test_an_lm_built_in_memory_is_set_up_as_a_loaded_one(lms) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(lms["llama"])
    loaded = PrefixLM(folder, lora=LoraSettings(rank=4), gradient_checkpointing=True)
    built = PrefixLM.from_model(
        AutoModelForCausalLM.from_pretrained(folder),
        AutoTokenizer.from_pretrained(folder),
        lora=LoraSettings(rank=4),
        gradient_checkpointing=True,
    )
    trainable = lambda lm: {n: p.numel() for n, p in lm.named_parameters() if p.requires_grad}  # noqa: E731
    assert trainable(built) == trainable(loaded)
    assert built.frozen_state_keys() == loaded.frozen_state_keys()
    embeds = torch.randn(2, 4, loaded.embed_dim)
    torch.testing.assert_close(built.eval()(embeds), loaded.eval()(embeds))
    with pytest.raises(ValueError, match="choose one"):
        PrefixLM.from_model(built.base_model, built.tokenizer, trainable=True, lora=LoraSettings())


def test_the_rollout_with_logits_runs_through_the_adapters_with_gradients(lms) -> None:
    """``rollout_with_logits`` (DiscriTune's ``log_probs_from_rollout``) decodes with the base model's own
    generate under the peft wrapper: its logits are the adapted model's teacher-forced ones for the same
    tokens, and their gradient reaches the adapters."""
    captioner = adapted_captioner(lms["llama"]).train()
    perturb_adapters(captioner)
    features = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    ids, sequences, logits = captioner.rollout_with_logits(
        features, DecodingConfig(max_new_tokens=6, ignore_stops=True)
    )
    assert sequences.tolist() == ids and logits.shape[:2] == (2, 6)
    tokens = CaptionTokens.from_rows(ids, captioner.lm.pad_token_id, captioner.device)
    torch.testing.assert_close(logits, captioner(features, tokens).logits, rtol=1e-4, atol=1e-5)
    logits.logsumexp(-1).sum().backward()
    adapters = [p for name, p in captioner.named_parameters() if "lora_" in name]
    assert adapters and all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters)


def test_a_quantized_base_loads_onto_the_process_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under DDP the LM is built before Lightning sets each process's device: the quantized base goes to the
    GPU the launcher's LOCAL_RANK names, not to the current device (cuda:0 for every rank then). No GPU or
    bitsandbytes here: both are stood in for, and only the loading options are read."""
    import sys
    import types

    from clipcap.lm import _quantization_kwargs

    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert _quantization_kwargs("4bit", torch.float16)["device_map"] == {"": 3}
    monkeypatch.delenv("LOCAL_RANK")
    assert _quantization_kwargs("8bit", torch.float16)["device_map"] == {"": 0}
