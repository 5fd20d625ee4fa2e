"""Shared test set-up: offline Hugging Face, one torch thread, and a tiny synthetic world built once."""

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
