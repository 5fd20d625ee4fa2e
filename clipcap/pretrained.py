"""Resolution of model names to something ``from_pretrained`` can load.

Real checkpoints are named as Hugging Face names (``openai/clip-vit-base-patch32``, ``gpt2``) or local
folders and are passed through unchanged. Names of the form ``synthetic:<part>`` point into the embedded
synthetic world (``synthetic:clip``, ``synthetic:lm``), whose parts are ordinary Hugging Face folders, so they
load through exactly the same code path as real checkpoints. Resolving a name never builds anything: the
world is built by the entry points (``clipcap world``, and ``clipcap`` commands whose arguments or configs
name it, ``make demo``, the tests' session fixture).
"""

from __future__ import annotations

from transformers import PretrainedConfig

from clipcap.synthetic.location import BUILD_COMMAND, SYNTHETIC_SCHEME, default_world_dir, is_complete_world

__all__ = ["SYNTHETIC_SCHEME", "resolve_pretrained"]


def resolve_pretrained(name: str) -> str:
    """Returns a Hugging Face name or local folder for ``name``.

    Args:
        name: a Hugging Face name, a local folder, or ``synthetic:<part>``.

    Raises:
        FileNotFoundError: ``synthetic:<part>`` while the world is not built (naming the command that
            builds it), or a part the world does not have.
    """
    if not name.startswith(SYNTHETIC_SCHEME):
        return name
    world = default_world_dir()
    if not is_complete_world(world):
        raise FileNotFoundError(
            f"{name!r} names a part of the synthetic world, which is not built at {world}: build it with "
            f"`{BUILD_COMMAND}` (a few minutes on a CPU, once; `make demo` builds it too)"
        )
    part = name[len(SYNTHETIC_SCHEME) :]
    folder = world / part
    if not folder.is_dir():
        raise FileNotFoundError(f"{name!r}: the synthetic world has no part {part!r} (looked in {folder})")
    return str(folder)


def checkpoint_model_type(name: str) -> str | None:
    """The ``model_type`` of a checkpoint's ``config.json`` (``"clip"``, ``"blip"``, ...), or None when the
    config cannot be read (a name that is not downloaded, a typo): callers then load as usual and let
    ``from_pretrained`` report the problem.

    Args:
        name: a Hugging Face name, a local folder, or ``synthetic:<part>``.
    """
    try:
        config, _ = PretrainedConfig.get_config_dict(resolve_pretrained(name))
    except (OSError, ValueError):
        return None
    model_type = config.get("model_type")
    return str(model_type) if model_type is not None else None
