"""Shared test set-up: offline Hugging Face, one torch thread, a tiny synthetic world built once, and the
fixtures several test files use (tiny LMs, a tiny CLIP encoder, a trained checkpoint)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory):
    """A tiny synthetic world (images, captions, CLIP, LM, features), built once per test session.

    ``CLIPCAP_WORLD`` points at it, so ``synthetic:clip`` and ``synthetic:lm`` resolve here.
    """
    from clipcap.synthetic.world import WorldSpec, build_world

    world_dir = tmp_path_factory.mktemp("world") / "synthetic"
    build_world(world_dir, WorldSpec.tiny())
    previous = os.environ.get("CLIPCAP_WORLD")
    os.environ["CLIPCAP_WORLD"] = str(world_dir)
    yield world_dir
    if previous is None:
        os.environ.pop("CLIPCAP_WORLD", None)
    else:
        os.environ["CLIPCAP_WORLD"] = previous


@pytest.fixture(scope="session")
def gpt2_folder(tmp_path_factory: pytest.TempPathFactory):
    """A tiny GPT-2 (width 32, 4 heads, 2 layers) with a byte-level BPE tokenizer; nothing writes into it."""
    from tiny_models import save_tiny_gpt2

    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory: pytest.TempPathFactory):
    """A tiny LLaMA (width 32) whose tokenizer adds ``<s>``; nothing writes into it."""
    from tiny_models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def folders(gpt2_folder, llama_folder) -> dict:
    """Both tiny LMs by architecture, for tests parametrized over ``gpt2`` and ``llama``."""
    return {"gpt2": gpt2_folder, "llama": llama_folder}


@pytest.fixture(scope="session")
def tiny_clip_encoder():
    """A ``ClipEncoder`` over a tiny random CLIP (seed 0), named ``tiny``."""
    from clipcap.clip import ClipEncoder
    from tiny_models import tiny_clip_model

    return ClipEncoder.from_model(tiny_clip_model(seed=0), name="tiny")


@pytest.fixture(scope="session")
def trained_checkpoint(tiny_world, tmp_path_factory: pytest.TempPathFactory):
    """A checkpoint of ``lightning_configs/synthetic/ce.yaml`` trained for 4 steps on the tiny world (its
    last, after one validation batch)."""
    from pathlib import Path

    from clipcap.training.cli import lightning_cli

    root = tmp_path_factory.mktemp("trained")
    cli = lightning_cli(
        ["fit", "--config", "lightning_configs/synthetic/ce.yaml", "--trainer.default_root_dir", str(root),
         "--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=1",
         "--trainer.enable_progress_bar=false", "--trainer.logger=false"]
    )  # fmt: skip
    return Path(cli.trainer.checkpoint_callback.last_model_path)
