"""The synthetic world: procedurally drawn scenes with human-like captions, a tiny CLIP and a tiny LM.

It is the embedded default in which the demo, tests and benchmarks run with no downloads; see
:mod:`clipcap.synthetic.scenes` for the scenes and captions and :mod:`clipcap.synthetic.world` for the
world folder and its build.
"""

from __future__ import annotations

import importlib
from typing import Any

from clipcap.synthetic.scenes import (
    Scene,
    SceneObject,
    caption_scene,
    describe_scene,
    generate_captions,
    generate_scene,
    render_scene,
    sample_scene,
)

# The world module is imported on first use rather than here: `python -m clipcap.synthetic.world` would
# otherwise find it already imported by this package and runpy warns about executing it twice.
_WORLD_NAMES = frozenset(
    {
        "SceneRecord",
        "WorldSpec",
        "build_world",
        "default_world_dir",
        "ensure_world",
        "is_complete_world",
        "load_annotations",
        "read_world_info",
    }
)


def __getattr__(name: str) -> Any:
    if name in _WORLD_NAMES:
        return getattr(importlib.import_module("clipcap.synthetic.world"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Scene",
    "SceneObject",
    "SceneRecord",
    "WorldSpec",
    "build_world",
    "caption_scene",
    "default_world_dir",
    "describe_scene",
    "ensure_world",
    "generate_captions",
    "generate_scene",
    "is_complete_world",
    "load_annotations",
    "read_world_info",
    "render_scene",
    "sample_scene",
]
