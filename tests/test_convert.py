"""``clipcap convert``: original ClipCap, DiscriTune and OpenAI CLIP checkpoints against their own forwards.

The references are short re-implementations of ClipCap's ``MLP`` and ``TransformerMapper`` (from
rmokady/CLIP_prefix_caption ``train.py``), and openai's own ``clip/model.py`` loaded by file path (the
``clip`` package itself does not import here). Their state dicts are written in the original layouts,
stale GPT-2 buffers and EGG's wrappers included, and the converted models must compute the same outputs.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
import types
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from clipcap.captioner import ClipCaptioner
from clipcap.checkpoints import read_checkpoint
from clipcap.commands import main as clipcap_main
from clipcap.commands.convert import main as convert_main
from clipcap.convert import (
    DISCRITUNE_PREFIX,
    gpt2_config,
    load_converted_mapper,
    openai_clip_to_hf,
    read_original_captioner,
)
from clipcap.convert.weights import state_dict_of
from clipcap.lm import PrefixLM
from clipcap.mapper import MLPMapper, TransformerMapper
from clipcap.objectives import CrossEntropy
from clipcap.training.module import CaptionModule

torch.set_num_threads(1)

CLIP_DIM = 12
PREFIX_LENGTH = 4
BATCH = 3


# --- ClipCap's modules, re-implemented (train.py of rmokady/CLIP_prefix_caption) --------------------------


class ClipCapMLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(nn.Tanh())
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class ClipCapAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, dim * 2, bias=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        queries = self.to_queries(x).reshape(b, n, self.num_heads, c // self.num_heads)
        keys_values = self.to_keys_values(x).reshape(b, n, 2, self.num_heads, c // self.num_heads)
        keys, values = keys_values[:, :, 0], keys_values[:, :, 1]
        attention = torch.einsum("bnhd,bmhd->bnmh", queries, keys) * self.scale
        attention = attention.softmax(dim=2)
        out = torch.einsum("bnmh,bmhd->bnhd", attention, values).reshape(b, n, c)
        return self.project(out)


class ClipCapMlpTransformer(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class ClipCapTransformerLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ClipCapAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ClipCapMlpTransformer(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClipCapTransformer(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_layers: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [ClipCapTransformerLayer(dim, num_heads, mlp_ratio) for _ in range(num_layers)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class ClipCapTransformerMapper(nn.Module):
    def __init__(
        self, dim_clip: int, dim_embedding: int, prefix_length: int, clip_length: int, num_layers: int
    ):
        super().__init__()
        self.clip_length = clip_length
        self.transformer = ClipCapTransformer(dim_embedding, 8, num_layers)
        self.linear = nn.Linear(dim_clip, clip_length * dim_embedding)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, dim_embedding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x).view(x.shape[0], self.clip_length, -1)
        prefix = self.prefix_const.unsqueeze(0).expand(x.shape[0], *self.prefix_const.shape)
        prefix = torch.cat((x, prefix), dim=1)
        return self.transformer(prefix)[:, self.clip_length :]


class ClipCaptionModel(nn.Module):
    """ClipCap's captioner: ``clip_project`` and ``gpt``, with its teacher-forced forward."""

    def __init__(self, clip_project: nn.Module, gpt: GPT2LMHeadModel, prefix_length: int) -> None:
        super().__init__()
        self.clip_project = clip_project
        self.gpt = gpt
        self.prefix_length = prefix_length

    def prefix(self, clip_features: torch.Tensor) -> torch.Tensor:
        width = self.gpt.transformer.wte.weight.shape[1]
        return self.clip_project(clip_features).view(-1, self.prefix_length, width)

    def forward(self, tokens: torch.Tensor, clip_features: torch.Tensor) -> torch.Tensor:
        embeddings = torch.cat([self.prefix(clip_features), self.gpt.transformer.wte(tokens)], dim=1)
        return self.gpt(inputs_embeds=embeddings).logits


def original_state_dict(model: ClipCaptionModel) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as the transformers of 2021 saved it: with GPT-2's causal-mask buffers."""
    weights = {key: value.clone() for key, value in model.state_dict().items()}
    positions = model.gpt.config.n_positions
    for index in range(model.gpt.config.n_layer):
        mask = torch.tril(torch.ones(positions, positions, dtype=torch.uint8)).view(
            1, 1, positions, positions
        )
        weights[f"gpt.transformer.h.{index}.attn.bias"] = mask
        weights[f"gpt.transformer.h.{index}.attn.masked_bias"] = torch.tensor(-1e4)
    return weights


# --- fixtures ----------------------------------------------------------------------------------------------


def finetuned_gpt2(folder: Path, seed: int) -> GPT2LMHeadModel:
    """The tiny GPT-2 with perturbed weights, as ClipCap's finetuning leaves it."""
    torch.manual_seed(seed)
    gpt = GPT2LMHeadModel.from_pretrained(folder)
    with torch.no_grad():
        for parameter in gpt.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return gpt.eval()


@pytest.fixture(scope="module")
def mlp_clipcap(gpt2_folder: Path) -> ClipCaptionModel:
    gpt = finetuned_gpt2(gpt2_folder, seed=1)
    width = gpt.config.n_embd
    mapper = ClipCapMLP((CLIP_DIM, (width * PREFIX_LENGTH) // 2, width * PREFIX_LENGTH))
    return ClipCaptionModel(mapper, gpt, PREFIX_LENGTH).eval()


@pytest.fixture(scope="module")
def transformer_clipcap(gpt2_folder: Path) -> ClipCaptionModel:
    gpt = finetuned_gpt2(gpt2_folder, seed=2)
    mapper = ClipCapTransformerMapper(CLIP_DIM, gpt.config.n_embd, PREFIX_LENGTH, clip_length=3, num_layers=2)
    with torch.no_grad():  # LayerNorms away from their (1, 0) initialisation, so that their mapping shows
        for name, parameter in mapper.named_parameters():
            if "norm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return ClipCaptionModel(mapper, gpt, PREFIX_LENGTH).eval()


@pytest.fixture(scope="module")
def mlp_checkpoint(mlp_clipcap: ClipCaptionModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clipcap") / "coco_weights.pt"
    torch.save(original_state_dict(mlp_clipcap), path)
    return path


def clip_features() -> torch.Tensor:
    return torch.randn(BATCH, CLIP_DIM, generator=torch.Generator().manual_seed(7))


def tokens(vocab_size: int, length: int = 5) -> torch.Tensor:
    return torch.randint(0, vocab_size, (BATCH, length), generator=torch.Generator().manual_seed(8))


def assert_same_captioner(original, reference: ClipCaptionModel, gpt2_folder: Path) -> None:
    """The converted mapper and GPT-2 compute what the original ClipCap model does."""
    features = clip_features()
    with torch.no_grad():
        torch.testing.assert_close(
            original.mapper.build()(features), reference.prefix(features), atol=1e-5, rtol=1e-5
        )
        lm = original.build_lm(lm=str(gpt2_folder))
        ids = tokens(lm.config.vocab_size)
        torch.testing.assert_close(lm(ids).logits, reference.gpt(ids).logits, atol=1e-5, rtol=1e-5)


# --- ClipCap ------------------------------------------------------------------------------------------------


def test_mlp_checkpoint_converts_with_stale_buffers(mlp_clipcap, mlp_checkpoint, gpt2_folder) -> None:
    original = read_original_captioner(mlp_checkpoint)
    assert original.mapper.mapper_class is MLPMapper
    assert original.mapper.init_args == {"prefix_length": PREFIX_LENGTH, "hidden_dim": 64}
    assert original.mapper.clip_dim == CLIP_DIM
    assert not any(key.endswith((".attn.bias", ".attn.masked_bias")) for key in original.lm_weights)
    assert_same_captioner(original, mlp_clipcap, gpt2_folder)


def test_transformer_checkpoint_converts(transformer_clipcap, gpt2_folder, tmp_path: Path) -> None:
    path = tmp_path / "transformer_weights.pt"
    torch.save(original_state_dict(transformer_clipcap), path)
    original = read_original_captioner(path)
    assert original.mapper.mapper_class is TransformerMapper
    assert original.mapper.init_args == {
        "prefix_length": PREFIX_LENGTH,
        "clip_length": 3,
        "num_layers": 2,
        "num_heads": 8,
        "mlp_ratio": 2.0,
    }
    assert_same_captioner(original, transformer_clipcap, gpt2_folder)
    # model.init_from takes the file too, into a captioner with the same Transformer mapper.
    mapper = functools.partial(TransformerMapper, prefix_length=PREFIX_LENGTH, clip_length=3, num_layers=2)
    captioner = ClipCaptioner(PrefixLM(str(gpt2_folder), trainable=True), mapper, clip_dim=CLIP_DIM)
    module = CaptionModule(captioner, CrossEntropy(), init_from=str(path))
    features = clip_features()
    with torch.no_grad():
        prefix = module.captioner.eval().prefix(features)
        torch.testing.assert_close(prefix, transformer_clipcap.prefix(features), atol=1e-5, rtol=1e-5)


def test_gpt2_config_is_inferred_from_shapes(mlp_clipcap, mlp_checkpoint) -> None:
    original = read_original_captioner(mlp_checkpoint)
    config = gpt2_config(original.lm_weights, "x.pt", n_head=4)
    expected = mlp_clipcap.gpt.config
    assert (config.vocab_size, config.n_positions, config.n_embd, config.n_layer, config.n_head) == (
        expected.vocab_size,
        expected.n_positions,
        expected.n_embd,
        expected.n_layer,
        4,
    )
    assert config.tie_word_embeddings
    lm = original.build_lm(n_head=4)  # no --lm: the same model from shapes alone
    ids = tokens(config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, mlp_clipcap.gpt(ids).logits, atol=1e-5, rtol=1e-5)


def test_gpt2_heads_default_to_gpt2_base_and_are_required_otherwise() -> None:
    def shapes(width: int) -> dict[str, torch.Tensor]:  # meta tensors: GPT-2-sized shapes, no memory
        meta = functools.partial(torch.empty, device="meta")
        return {
            "transformer.wte.weight": meta(50257, width),
            "transformer.wpe.weight": meta(1024, width),
            "transformer.h.0.mlp.c_fc.weight": meta(width, 4 * width),
            "transformer.h.1.mlp.c_fc.weight": meta(width, 4 * width),
        }

    base = gpt2_config(shapes(768), "gpt2.pt")
    assert (base.n_head, base.n_layer, base.n_inner, base.eos_token_id) == (12, 2, None, 50256)
    with pytest.raises(ValueError, match=r"x\.pt: GPT-2 of width 1024.*--n_head"):
        gpt2_config(shapes(1024), "x.pt")
    assert gpt2_config(shapes(1024), "x.pt", n_head=16).n_head == 16
    with pytest.raises(ValueError, match="n_head=5 does not divide"):
        gpt2_config(shapes(768), "x.pt", n_head=5)


# --- DiscriTune (EGG) ---------------------------------------------------------------------------------------


def discritune_game_state_dict(reference: ClipCaptionModel, added_rows: int) -> dict[str, torch.Tensor]:
    """``ReinforceCaptionGame.state_dict()`` saved while EGG had patched GPT-2 for B·P prefix rows."""
    clipcap = original_state_dict(reference)
    vocab, width = clipcap["gpt.transformer.wte.weight"].shape
    patched_embeddings = torch.cat([clipcap["gpt.transformer.wte.weight"], torch.randn(added_rows, width)])
    clipcap["gpt.transformer.wte.weight"] = patched_embeddings
    clipcap["gpt.lm_head.weight"] = patched_embeddings
    clipcap["gpt.lm_head.bias"] = torch.cat([torch.zeros(vocab), torch.full((added_rows,), float("-inf"))])
    game = {
        "sender.clip_vit.conv1.weight": torch.randn(8, 3, 4, 4),
        "sender.clip_vit.proj": torch.randn(8, CLIP_DIM),
    }
    game.update({DISCRITUNE_PREFIX + key: value for key, value in clipcap.items()})
    game["receiver.clip.logit_scale"] = torch.tensor(4.6)
    return game


class EggCheckpoint(NamedTuple):
    epoch: int
    model_state_dict: dict[str, Any]
    optimizer_state_dict: dict[str, Any]
    optimizer_scheduler_state_dict: dict[str, Any] | None


# Pickled under EGG's name, as egg.core.callbacks.Checkpoint.
EggCheckpoint.__module__ = "egg.core.callbacks"
EggCheckpoint.__qualname__ = EggCheckpoint.__name__ = "Checkpoint"


def save_egg_checkpoint(game: dict[str, torch.Tensor], path: Path) -> None:
    """Saves what EGG's ``CheckpointSaver`` saves: an ``egg.core.callbacks.Checkpoint`` tuple."""
    names = ("egg", "egg.core", "egg.core.callbacks")
    modules = {name: types.ModuleType(name) for name in names}
    modules["egg.core.callbacks"].Checkpoint = EggCheckpoint
    sys.modules.update(modules)
    try:
        optimizer = {"state": {}, "param_groups": [{"lr": 1e-6, "params": [0, 1]}]}
        torch.save(EggCheckpoint(3, game, optimizer, None), path)
    finally:
        for name in names:
            sys.modules.pop(name)


def test_discritune_checkpoints_convert(mlp_clipcap, gpt2_folder, tmp_path: Path) -> None:
    game = discritune_game_state_dict(mlp_clipcap, added_rows=BATCH * PREFIX_LENGTH)
    sender_clipcap = {
        k[len(DISCRITUNE_PREFIX) :]: v for k, v in game.items() if k.startswith(DISCRITUNE_PREFIX)
    }
    plain, egg, bare = (
        tmp_path / "clip_clap_model_final.pt",
        tmp_path / "final.tar",
        tmp_path / "clip_clap_model_1.pt",
    )
    torch.save(game, plain)  # ModelSaver: game.state_dict()
    save_egg_checkpoint(game, egg)  # CheckpointSaver
    assert "egg" not in sys.modules
    torch.save(sender_clipcap, bare)  # earlier ModelSaver: game.sender.clipcap.state_dict(), still patched
    for path in (plain, egg, bare):
        original = read_original_captioner(path)
        assert original.lm_weights["transformer.wte.weight"].shape[0] == mlp_clipcap.gpt.config.vocab_size
        assert "lm_head.bias" not in original.lm_weights
        assert_same_captioner(original, mlp_clipcap, gpt2_folder)
    out = tmp_path / "converted"
    clipcap_main(
        ["convert", "discritune", "--checkpoint", str(egg), "--out", str(out), "--lm", str(gpt2_folder)]
    )
    assert (out / "clipcap.ckpt").is_file() and (out / "lm" / "config.json").is_file()
    # It carries EGG's test decoding: stop after any "."-holding token or EOS, transformers' beam search
    # with 5 beams and its default early_stopping (False), 30 caption tokens.
    module = CaptionModule.load_from_checkpoint(out / "clipcap.ckpt", weights_only=True)
    captioner = module.captioner
    assert (captioner.caption_end, captioner.beam_ranking) == ("eos_or_period", "transformers")
    decoding = module.decoding
    assert (decoding.num_beams, decoding.max_new_tokens, decoding.early_stopping) == (5, 30, False)
    stops = captioner.stop_ids(decoding)
    assert stops[0] == captioner.lm.eos_token_id and set(stops[1:]) == set(captioner.lm.period_token_ids)


def test_clipcap_command_points_a_discritune_game_to_its_command(mlp_clipcap, tmp_path: Path) -> None:
    torch.save(discritune_game_state_dict(mlp_clipcap, added_rows=4), tmp_path / "game.pt")
    with pytest.raises(
        ValueError,
        match=r"game\.pt: not a ClipCap or DiscriTune checkpoint: .* at the top level; they are under "
        r"'sender\.clipcap\.' \(`clipcap convert discritune`\)",
    ):
        convert_main(["clipcap", "--checkpoint", str(tmp_path / "game.pt"), "--out", str(tmp_path / "o")])


# --- errors -------------------------------------------------------------------------------------------------


def read_checkpoint_of(path: Path, content: Any) -> Any:
    torch.save(content, path)
    return read_checkpoint(path)


def test_bad_captioner_checkpoints_are_named(
    mlp_clipcap, mlp_checkpoint, gpt2_folder, tmp_path: Path
) -> None:
    weights = original_state_dict(mlp_clipcap)

    def read(state: Any, name: str):
        path = tmp_path / name
        torch.save(state, path)
        original = read_original_captioner(path)
        original.build_lm(lm=str(gpt2_folder))
        return original

    with pytest.raises(FileNotFoundError, match="missing.pt"):
        read_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"unknown\.pt: not a ClipCap or DiscriTune checkpoint"):
        read({"encoder.weight": torch.zeros(2)}, "unknown.pt")
    no_bias = {k: v for k, v in weights.items() if k != "clip_project.model.2.bias"}
    with pytest.raises(ValueError, match=r"no_bias\.pt: .*'clip_project\.model\.2\.bias'"):
        read(no_bias, "no_bias.pt")
    linear = {k: v for k, v in weights.items() if not k.startswith("clip_project.")}
    linear |= {"clip_project.weight": torch.zeros(128, CLIP_DIM), "clip_project.bias": torch.zeros(128)}
    with pytest.raises(ValueError, match=r"linear\.pt: clip_project\.weight is a single Linear mapper"):
        read(linear, "linear.pt")
    deeper = weights | {"clip_project.model.4.weight": torch.zeros(2, 2)}
    with pytest.raises(
        ValueError, match=r"deeper\.pt: unexpected ClipCap MLP key clip_project\.model\.4\.weight"
    ):
        read(deeper, "deeper.pt")
    short = weights | {"gpt.transformer.wpe.weight": weights["gpt.transformer.wpe.weight"][:64]}
    with pytest.raises(
        ValueError,
        match=r"short\.pt: GPT-2 weight 'transformer\.wpe\.weight' has shape \(64, 32\).*\(128, 32\)",
    ):
        read(short, "short.pt")
    biased = weights | {"gpt.lm_head.bias": torch.ones(weights["gpt.lm_head.weight"].shape[0])}
    with pytest.raises(ValueError, match=r"biased\.pt: gpt\.lm_head\.bias is not EGG's prefix padding"):
        read(biased, "biased.pt")
    with pytest.raises(
        ValueError, match=r"objects\.pt: refused: it holds pickled Python objects \(torch\.nn"
    ):
        read_checkpoint_of(tmp_path / "objects.pt", {"model": nn.Linear(2, 2)})
    with pytest.raises(ValueError, match=r"lightning\.ckpt is a Lightning checkpoint"):
        state_dict_of({"state_dict": {}, "pytorch-lightning_version": "2.6"}, "lightning.ckpt")


# --- CLI and model.init_from --------------------------------------------------------------------------------


def teacher_forcing(
    captioner: ClipCaptioner, reference: ClipCaptionModel
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our captioner's teacher-forced logits and the original ClipCap's on the same captions."""
    features = clip_features()
    captions = captioner.encode_captions(["a red circle.", "a blue square on the left!", "two shapes"])
    with torch.no_grad():
        ours = captioner(features, captions).logits
        theirs = reference(captions.input_ids, features)[:, PREFIX_LENGTH - 1 : -1]
    mask = captions.attention_mask.bool()
    return ours[mask], theirs[mask]


def convert_with_the_command(checkpoint: Path, gpt2_folder: Path, out: Path) -> Path:
    """``clipcap convert clipcap --checkpoint ... --out out --lm gpt2_folder``; returns ``out``."""
    clipcap_main(
        ["convert", "clipcap", "--checkpoint", str(checkpoint), "--out", str(out), "--lm", str(gpt2_folder)]
    )
    return out


def test_cli_writes_a_loadable_captioner(
    mlp_clipcap, mlp_checkpoint, gpt2_folder, tmp_path: Path, capsys
) -> None:
    from jsonargparse import ActionConfigFile, ArgumentParser

    out = tmp_path / "converted"
    convert_with_the_command(mlp_checkpoint, gpt2_folder, out)
    assert f"--config {out / 'model.yaml'}" in capsys.readouterr().out
    assert {"lm", "mapper.safetensors", "model.yaml", "clipcap.ckpt"} <= {p.name for p in out.iterdir()}
    features = clip_features()
    with torch.no_grad():
        mapper = load_converted_mapper(out / "mapper.safetensors")
        torch.testing.assert_close(mapper(features), mlp_clipcap.prefix(features), atol=1e-5, rtol=1e-5)

    # The checkpoint rebuilds the whole captioner: the converted mapper and the GPT-2 in out/lm.
    module = CaptionModule.load_from_checkpoint(out / "clipcap.ckpt", weights_only=False)
    torch.testing.assert_close(*teacher_forcing(module.captioner.eval(), mlp_clipcap), atol=1e-4, rtol=1e-4)

    # model.yaml, given after a training config, starts a run from it (model.init_from).
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(CaptionModule, "model", fail_untyped=False)
    config = parser.parse_args(
        [
            "--model.objective=clipcap.objectives.CrossEntropy",
            "--config",
            str(out / "model.yaml"),
            f"--model.captioner.init_args.clip_dim={CLIP_DIM}",  # the CLI links it from the data
        ]
    )
    assert config.model.init_from == str(out / "clipcap.ckpt")
    module = parser.instantiate_classes(config).model
    torch.testing.assert_close(*teacher_forcing(module.captioner.eval(), mlp_clipcap), atol=1e-4, rtol=1e-4)


def test_a_failed_conversion_leaves_no_folder_and_a_folder_in_use_is_refused(
    mlp_checkpoint, tmp_path: Path
) -> None:
    """The output is written under a temporary name and renamed only when complete."""
    out = tmp_path / "converted"
    with pytest.raises(ValueError, match="n_head"):  # width 32: GPT-2's head count cannot be inferred
        convert_main(["clipcap", "--checkpoint", str(mlp_checkpoint), "--out", str(out)])
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(OSError, match="not empty"):
        convert_main(["clipcap", "--checkpoint", str(mlp_checkpoint), "--out", str(out), "--n_head", "4"])
    assert (out / "mine.txt").read_text() == "keep me"


def mlp_captioner(folder: Path, trainable: bool = True, prefix_length: int = PREFIX_LENGTH) -> ClipCaptioner:
    mapper = functools.partial(MLPMapper, prefix_length=prefix_length, hidden_dim=64)
    return ClipCaptioner(PrefixLM(str(folder), trainable=trainable), mapper, clip_dim=CLIP_DIM)


def test_init_from_takes_an_original_clipcap_file(mlp_clipcap, mlp_checkpoint, gpt2_folder) -> None:
    module = CaptionModule(mlp_captioner(gpt2_folder), CrossEntropy(), init_from=str(mlp_checkpoint))
    features = clip_features()
    with torch.no_grad():
        torch.testing.assert_close(
            module.captioner.prefix(features), mlp_clipcap.prefix(features), atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(*teacher_forcing(module.captioner.eval(), mlp_clipcap), atol=1e-4, rtol=1e-4)


def test_init_from_takes_an_egg_checkpoint(mlp_clipcap, gpt2_folder, tmp_path: Path) -> None:
    path = tmp_path / "final.tar"
    save_egg_checkpoint(discritune_game_state_dict(mlp_clipcap, added_rows=8), path)
    module = CaptionModule(mlp_captioner(gpt2_folder), CrossEntropy(), init_from=str(path))
    torch.testing.assert_close(*teacher_forcing(module.captioner.eval(), mlp_clipcap), atol=1e-4, rtol=1e-4)


def test_init_from_names_what_does_not_match(mlp_checkpoint, gpt2_folder) -> None:
    with pytest.raises(
        ValueError,
        match=r"init_from: .*coco_weights\.pt: mapper weight 'net\.3\.weight' \(from 'clip_project\.model\.2\.weight'\) "
        r"has shape \(128, 64\) in the checkpoint but \(96, 64\) here",
    ):
        CaptionModule(
            mlp_captioner(gpt2_folder, prefix_length=3), CrossEntropy(), init_from=str(mlp_checkpoint)
        )
    transformer = ClipCaptioner(PrefixLM(str(gpt2_folder)), TransformerMapper, clip_dim=CLIP_DIM)
    with pytest.raises(
        ValueError, match="holds a ClipCap MLPMapper but this captioner's mapper is a TransformerMapper"
    ):
        CaptionModule(transformer, CrossEntropy(), init_from=str(mlp_checkpoint))
    # The finetuned GPT-2 cannot go into a frozen LM, which checkpoints reload from its pretrained source.
    with pytest.raises(
        ValueError, match=r"its GPT-2 differs from the frozen LM .*gpt\.transformer\.wte\.weight"
    ):
        CaptionModule(
            mlp_captioner(gpt2_folder, trainable=False), CrossEntropy(), init_from=str(mlp_checkpoint)
        )


# --- OpenAI CLIP --------------------------------------------------------------------------------------------


def openai_clip_model_module() -> types.ModuleType:
    """openai's ``clip/model.py``, loaded by path: ``import clip`` needs torchvision, which is not here."""
    package = importlib.util.find_spec("clip")
    assert package is not None and package.submodule_search_locations
    path = Path(next(iter(package.submodule_search_locations))) / "model.py"
    spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def openai_clip() -> nn.Module:
    """A tiny OpenAI ViT CLIP: 128-wide towers, so 2 heads of 64 each, as OpenAI's width // 64 gives."""
    clip_model = openai_clip_model_module()
    torch.manual_seed(0)
    model = clip_model.CLIP(
        embed_dim=16,
        image_resolution=32,
        vision_layers=2,
        vision_width=128,
        vision_patch_size=8,
        context_length=12,
        vocab_size=100,
        transformer_width=128,
        transformer_heads=2,
        transformer_layers=2,
    )
    with torch.no_grad():  # LayerNorms and biases away from their (1, 0) initialisation
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model.eval()


def clip_inputs(vocab_size: int = 100, context_length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 32, 32, generator=generator)
    text = torch.zeros(2, context_length, dtype=torch.long)
    for row, length in enumerate((5, 9)):  # SOT, words, EOT (the highest id), then zero padding
        text[row, 0] = vocab_size - 2
        text[row, 1 : length - 1] = torch.randint(1, vocab_size - 2, (length - 2,), generator=generator)
        text[row, length - 1] = vocab_size - 1
    return images, text


def assert_same_clip(hf_model, reference: nn.Module) -> None:
    images, text = clip_inputs()
    with torch.no_grad():
        image_features = hf_model.get_image_features(pixel_values=images).pooler_output
        text_features = hf_model.get_text_features(input_ids=text).pooler_output
        torch.testing.assert_close(image_features, reference.encode_image(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(text_features, reference.encode_text(text), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hf_model.logit_scale.detach(), reference.logit_scale.detach())


def test_openai_clip_state_dict_converts(openai_clip, tmp_path: Path) -> None:
    from transformers import CLIPModel

    # OpenAI's files are fp16 and also hold the sizes build_model drops.
    weights = {key: value.half() for key, value in openai_clip.state_dict().items()}
    weights |= {
        "input_resolution": torch.tensor(32),
        "context_length": torch.tensor(12),
        "vocab_size": torch.tensor(100),
    }
    torch.save(weights, tmp_path / "ViT-tiny.pt")
    clipcap_main(
        ["convert", "clip", "--checkpoint", str(tmp_path / "ViT-tiny.pt"), "--out", str(tmp_path / "hf")]
    )
    hf_model = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    assert hf_model.dtype == torch.float32
    assert hf_model.config.text_config.hidden_act == hf_model.config.vision_config.hidden_act == "quick_gelu"
    assert hf_model.config.vision_config.num_attention_heads == 2
    rounded = openai_clip_model_module().CLIP(16, 32, 2, 128, 8, 12, 100, 128, 2, 2).eval()
    rounded.load_state_dict(
        {key: value.float() for key, value in weights.items() if key in openai_clip.state_dict()}
    )
    assert_same_clip(hf_model, rounded)


def test_openai_clip_torchscript_archive_converts(openai_clip, tmp_path: Path) -> None:
    # OpenAI's JIT files are traced; scripting their model.py fails (LayerNorm.forward casts by dtype).
    images, text = clip_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(openai_clip, (images, text), check_trace=False)
        torch.jit.save(traced, tmp_path / "ViT-jit.pt")
    hf_model = openai_clip_to_hf(state_dict_of(read_checkpoint(tmp_path / "ViT-jit.pt"), "jit"), "jit")
    assert_same_clip(hf_model, openai_clip)


def test_bad_clip_checkpoints_are_named(openai_clip, tmp_path: Path, capsys) -> None:
    weights = dict(openai_clip.state_dict())
    resnet = weights | {"visual.layer1.0.conv1.weight": torch.zeros(4, 4, 1, 1)}
    with pytest.raises(
        ValueError, match=r"RN50\.pt: a ResNet CLIP \(key 'visual\.layer1\.0\.conv1\.weight'\)"
    ):
        openai_clip_to_hf(resnet, "RN50.pt")
    with pytest.raises(ValueError, match=r"x\.pt: an OpenAI ViT CLIP needs key 'ln_final\.weight'"):
        openai_clip_to_hf({k: v for k, v in weights.items() if k != "ln_final.weight"}, "x.pt")
    with pytest.raises(ValueError, match=r"x\.pt: unexpected key 'visual\.extra'"):
        openai_clip_to_hf(weights | {"visual.extra": torch.zeros(1)}, "x.pt")
    no_bias = {k: v for k, v in weights.items() if k != "transformer.resblocks.1.attn.in_proj_bias"}
    with pytest.raises(
        ValueError,
        match=r"x\.pt: an OpenAI ViT CLIP needs key 'transformer\.resblocks\.1\.attn\.in_proj_bias'",
    ):
        openai_clip_to_hf(no_bias, "x.pt")
    torch.save(weights | {"visual.layer1.0.conv1.weight": torch.zeros(1)}, tmp_path / "RN50.pt")
    with pytest.raises(SystemExit) as stopped:
        clipcap_main(
            ["convert", "clip", "--checkpoint", str(tmp_path / "RN50.pt"), "--out", str(tmp_path / "o")]
        )
    assert stopped.value.code == 1
    assert re.fullmatch(r"clipcap convert: .*RN50\.pt: a ResNet CLIP.*\n", capsys.readouterr().err)


def test_gpt2_config_from_a_folder_must_be_gpt2(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    GPT2Config(n_embd=8, n_layer=1, n_head=2).save_pretrained(tmp_path / "gpt2")
    assert gpt2_config({}, "x.pt", lm=str(tmp_path / "gpt2")).n_head == 2
    assert gpt2_config({}, "x.pt", lm=str(tmp_path / "gpt2"), n_head=4).n_head == 4
    LlamaConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2
    ).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="is a 'llama' model; ClipCap checkpoints hold a GPT-2"):
        gpt2_config({}, "x.pt", lm=str(tmp_path / "llama"))


# --- ClipCap's decoding (predict.py of rmokady/CLIP_prefix_caption), written from its published code ------


@torch.no_grad()
def reference_generate2(model: ClipCaptionModel, embed: torch.Tensor, period: int, entry_length: int = 67):
    """predict.py's ``generate2`` for one image: the whole sequence re-run each step, top-p 0.8 filtering,
    then the most likely token; it stops after the "." token (EOS is an ordinary token)."""
    generated, tokens = embed, []
    for _ in range(entry_length):
        logits = model.gpt(inputs_embeds=generated).logits[:, -1, :]
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cumulative > 0.8
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits[:, sorted_indices[remove]] = -float("inf")
        token = int(torch.argmax(logits, -1))
        tokens.append(token)
        generated = torch.cat([generated, model.gpt.transformer.wte(torch.tensor([[token]]))], dim=1)
        if token == period:
            break
    return tokens


@torch.no_grad()
def reference_generate_beam(
    model: ClipCaptionModel, embed: torch.Tensor, period: int, beam_size: int = 5, entry_length: int = 67
):
    """predict.py's ``generate_beam`` for one image: beams ranked by mean log-probability, a stopped beam
    padded with token 0 at log-probability 0 with its length frozen; the best mean wins."""
    generated, tokens, scores = embed, None, None
    seq_lengths = torch.ones(beam_size)
    is_stopped = torch.zeros(beam_size, dtype=torch.bool)
    for _ in range(entry_length):
        logits = model.gpt(inputs_embeds=generated).logits[:, -1, :].softmax(-1).log()
        if scores is None:
            scores, next_tokens = logits.topk(beam_size, -1)
            generated = generated.expand(beam_size, *generated.shape[1:])
            next_tokens, scores = next_tokens.permute(1, 0), scores.squeeze(0)
            tokens = next_tokens
        else:
            logits[is_stopped] = -float("inf")
            logits[is_stopped, 0] = 0
            scores_sum = scores[:, None] + logits
            seq_lengths[~is_stopped] += 1
            average, next_tokens = (scores_sum / seq_lengths[:, None]).view(-1).topk(beam_size, -1)
            source = next_tokens // scores_sum.shape[1]
            seq_lengths = seq_lengths[source]
            next_tokens = (next_tokens % scores_sum.shape[1]).unsqueeze(1)
            tokens = torch.cat((tokens[source], next_tokens), dim=1)
            generated = generated[source]
            scores = average * seq_lengths
            is_stopped = is_stopped[source]
        embedded = model.gpt.transformer.wte(next_tokens.squeeze()).view(generated.shape[0], 1, -1)
        generated = torch.cat((generated, embedded), dim=1)
        is_stopped = is_stopped + next_tokens.eq(period).squeeze()
        if is_stopped.all():
            break
    best = int((scores / seq_lengths).argsort(descending=True)[0])
    return tokens[best, : int(seq_lengths[best])].tolist()


def sharpen_towards_the_period(gpt: nn.Module, period: int) -> None:
    """A tiny random GPT-2 rarely says "." and its logits are nearly flat: scaled and nudged, its captions
    stop at different lengths and its choices are not near-ties."""

    def hook(module, args, output):
        output = output * 8.0
        output[..., period] += 6.0
        return output

    gpt.get_output_embeddings().register_forward_hook(hook)


def test_a_converted_clipcap_decodes_as_clipcap_does(mlp_checkpoint, gpt2_folder, tmp_path: Path) -> None:
    """A converted checkpoint carries ClipCap's decoding: greedy captions equal generate2's and beam-5
    ones generate_beam's, token for token, stopping at the "." token; EOS is not a stop."""
    out = tmp_path / "converted"
    convert_with_the_command(mlp_checkpoint, gpt2_folder, out)
    module = CaptionModule.load_from_checkpoint(out / "clipcap.ckpt", weights_only=True)
    captioner = module.captioner.eval()
    assert (captioner.caption_end, captioner.beam_ranking) == ("period_token", "clipcap")
    assert (module.decoding.num_beams, module.decoding.max_new_tokens) == (1, 67)  # generate2's
    period = captioner.lm.tokenizer.encode(".", add_special_tokens=False)[0]
    assert captioner.stop_ids(module.decoding) == [period]

    reference = ClipCaptionModel(
        nn.Identity(), GPT2LMHeadModel.from_pretrained(out / "lm"), PREFIX_LENGTH
    ).eval()
    sharpen_towards_the_period(reference.gpt, period)
    sharpen_towards_the_period(captioner.lm.model, period)
    features = torch.randn(8, CLIP_DIM, generator=torch.Generator().manual_seed(3))
    prefixes = captioner.prefix(features).detach()
    greedy = captioner.generate_ids(features, module.decoding)
    beams = captioner.generate_ids(features, replace(module.decoding, num_beams=5))
    expected_greedy = [reference_generate2(reference, prefix[None], period) for prefix in prefixes]
    expected_beams = [reference_generate_beam(reference, prefix[None], period) for prefix in prefixes]
    assert greedy == expected_greedy
    assert beams == expected_beams
    lengths = {len(ids) for ids in greedy + beams}
    assert len(lengths) > 2 and any(ids[-1] == period for ids in beams)  # stops at several lengths
    assert greedy != beams


def test_early_stopping_is_a_decoding_option(gpt2_folder: Path) -> None:
    from clipcap.generation import DecodingConfig

    assert DecodingConfig(num_beams=5).generation_config([0], 0).early_stopping is True  # the default
    assert DecodingConfig(num_beams=5, early_stopping=False).generation_config([0], 0).early_stopping is False
    assert (
        DecodingConfig(num_beams=5, early_stopping="never").generation_config([0], 0).early_stopping
        == "never"
    )
    with pytest.raises(ValueError, match="early_stopping"):
        DecodingConfig(early_stopping="soon")
    with pytest.raises(ValueError, match="beam_ranking"):
        DecodingConfig(beam_ranking="clip-cap")
