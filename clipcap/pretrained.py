"""Resolution of model names to something ``from_pretrained`` can load.

Real checkpoints are named as Hugging Face names (``openai/clip-vit-base-patch32``, ``gpt2``) or local
folders and are passed through unchanged. Names of the form ``synthetic:<part>`` point into the embedded
synthetic world (``synthetic:clip``, ``synthetic:lm``); the world is built on first use and its parts are
ordinary Hugging Face folders, so they load through exactly the same code path as real checkpoints.
"""

from __future__ import annotations

SYNTHETIC_SCHEME = "synthetic:"


def resolve_pretrained(name: str) -> str:
    """Returns a Hugging Face name or local folder for ``name``, building the synthetic world if needed.

    Args:
        name: a Hugging Face name, a local folder, or ``synthetic:<part>``.
    """
    if not name.startswith(SYNTHETIC_SCHEME):
        return name
    from clipcap.synthetic.world import ensure_world

    part = name[len(SYNTHETIC_SCHEME) :]
    folder = ensure_world() / part
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
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(resolve_pretrained(name))
    except (OSError, ValueError):
        return None
    model_type = config.get("model_type")
    return str(model_type) if model_type is not None else None
