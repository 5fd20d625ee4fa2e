"""The synthetic world: procedurally drawn scenes with human-like captions, a tiny CLIP and a tiny LM.

It is the embedded default in which the demo, tests and benchmarks run with no downloads; see
:mod:`clipcap.synthetic.scenes` for the scenes and captions and :mod:`clipcap.synthetic.world` for the
world folder and its build (imported by name: it loads torch and transformers), and
:mod:`clipcap.synthetic.location` for where a world is.
"""

from __future__ import annotations

from clipcap.synthetic.location import default_world_dir, is_complete_world, read_world_info
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

__all__ = [
    "Scene",
    "SceneObject",
    "caption_scene",
    "default_world_dir",
    "describe_scene",
    "generate_captions",
    "generate_scene",
    "is_complete_world",
    "read_world_info",
    "render_scene",
    "sample_scene",
]
