"""``clipcap world``: build the synthetic world (:mod:`clipcap.synthetic.world`) and say where it is."""

from __future__ import annotations

import logging
from pathlib import Path

from clipcap.commands.parsing import run_function
from clipcap.synthetic.location import default_world_dir, read_world_info
from clipcap.synthetic.world import WorldSpec, build_world


def world(dir: Path | None = None, tiny: bool = False, force: bool = False) -> Path:
    """Build the synthetic world: images, captions, a tiny CLIP, a tiny LM and CLIP features.

    Args:
        dir: the world folder (default: $CLIPCAP_WORLD, else $CLIPCAP_CACHE/<name>, else
            ~/.cache/clipcap/<name>, <name> being synthetic-world-v<version>)
        tiny: build the tiny test world instead of the default
        force: rebuild even if a complete world is there

    Returns:
        The world folder.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    world_dir = dir if dir is not None else default_world_dir()
    build_world(world_dir, WorldSpec.tiny() if tiny else WorldSpec.default(), force=force)
    metrics = (read_world_info(world_dir) or {}).get("metrics") or {}
    print(f"synthetic world: {world_dir}")
    if metrics:
        print(
            f"CLIP R@1 (text→image, {metrics['clip_retrieval_block']} test images): "
            f"descriptions {100 * metrics['clip_description_r1']:.1f}%, "
            f"captions {100 * metrics['clip_caption_r1']:.1f}%; "
            f"LM loss {metrics['lm_loss']:.3f} (val {metrics['lm_val_loss']:.3f})"
        )
    return world_dir


def main(argv: list[str]) -> Path:
    return run_function(world, argv, "clipcap world")
