"""Where the synthetic world lives and whether it is complete: what resolving a ``synthetic:`` name needs,
without the code that builds the world (:mod:`clipcap.synthetic.world`), so that the name resolver stays at
the bottom of the import graph."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

WORLD_VERSION = 1
"""Bumped whenever a change to the generator or the build makes older worlds incompatible."""
WORLD_DIR_NAME = f"synthetic-world-v{WORLD_VERSION}"
WORLD_FILE = "world.json"
SYNTHETIC_SCHEME = "synthetic:"
"""Model names with this prefix (``synthetic:clip``, ``synthetic:lm``) name the world's models."""
BUILD_COMMAND = "clipcap world"
"""How a user builds the world (``make demo`` builds it too)."""


def default_world_dir() -> Path:
    """Where the world lives: ``$CLIPCAP_WORLD``, else ``$CLIPCAP_CACHE/synthetic-world-v1``, else
    ``~/.cache/clipcap/synthetic-world-v1``."""
    if os.environ.get("CLIPCAP_WORLD"):
        return Path(os.environ["CLIPCAP_WORLD"]).expanduser()
    if os.environ.get("CLIPCAP_CACHE"):
        return Path(os.environ["CLIPCAP_CACHE"]).expanduser() / WORLD_DIR_NAME
    return Path.home() / ".cache" / "clipcap" / WORLD_DIR_NAME


def read_world_info(world_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The contents of ``world.json`` if ``world_dir`` holds a complete world of this version, else None."""
    path = Path(world_dir) / WORLD_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("version") != WORLD_VERSION or not info.get("complete"):
        return None
    return info


def is_complete_world(world_dir: str | os.PathLike[str]) -> bool:
    """Whether ``world_dir`` holds a complete world of the current version."""
    return read_world_info(world_dir) is not None


def names_the_synthetic_world(words: list[str]) -> bool:
    """Whether a command's arguments, or the config files it is given (``--config``), name the synthetic
    world: a ``synthetic:`` model name or the ``SyntheticCaptions`` data."""
    texts = list(words)
    for index, word in enumerate(words):
        path = word.split("=", 1)[1] if word.startswith("--config=") else None
        if word == "--config" and index + 1 < len(words):
            path = words[index + 1]
        if path and Path(path).is_file():
            texts.append(Path(path).read_text(encoding="utf-8", errors="replace"))
    return any(SYNTHETIC_SCHEME in text or "SyntheticCaptions" in text for text in texts)
