"""``clipcap convert clipcap|discritune|clip``: the original projects' checkpoints into clipcap's formats
(:mod:`clipcap.convert`)."""

from __future__ import annotations

import logging
from pathlib import Path

from jsonargparse import ArgumentParser

from clipcap.commands.parsing import call_with, function_parser, summary
from clipcap.convert import (
    CONVERTED_CHECKPOINT,
    CONVERTED_LM,
    CONVERTED_MAPPER,
    CONVERTED_MODEL_CONFIG,
    convert_clipcap,
    convert_discritune,
    convert_openai_clip,
)


def _say_what_was_written(written: Path) -> Path:
    print(
        f"wrote {written.parent}: {CONVERTED_LM}/, {CONVERTED_MAPPER}, {CONVERTED_MODEL_CONFIG}, "
        f"{CONVERTED_CHECKPOINT}\nstart a run from it: clipcap fit --config <training config> "
        f"--config {written.parent / CONVERTED_MODEL_CONFIG}\n"
        f"or, in a config of your own: --model.init_from={written}"
    )
    return written


def clipcap(checkpoint: str, out: str, lm: str | None = None, n_head: int | None = None) -> Path:
    """An original ClipCap .pt (rmokady/CLIP_prefix_caption) to a clipcap checkpoint.

    Args:
        checkpoint: the ClipCap file (``torch.save(model.state_dict())`` of its ``ClipCaptionModel``)
        out: output folder (lm/, mapper.safetensors, model.yaml, clipcap.ckpt)
        lm: GPT-2 name or folder for its config and tokenizer
        n_head: GPT-2's heads (default 12 for width 768)
    """
    return _say_what_was_written(convert_clipcap(checkpoint, out, lm, n_head))


def discritune(checkpoint: str, out: str, lm: str | None = None, n_head: int | None = None) -> Path:
    """A DiscriTune game checkpoint (EGG's clip_clap_model_*.pt or *.tar) to a clipcap checkpoint.

    Args:
        checkpoint: the EGG file
        out: output folder (lm/, mapper.safetensors, model.yaml, clipcap.ckpt)
        lm: GPT-2 name or folder for its config and tokenizer
        n_head: GPT-2's heads (default 12 for width 768)
    """
    return _say_what_was_written(convert_discritune(checkpoint, out, lm, n_head))


def clip(checkpoint: str, out: str) -> Path:
    """An OpenAI CLIP .pt (ViT) to a Hugging Face CLIPModel folder.

    Args:
        checkpoint: e.g. ViT-B-32.pt from openai/CLIP
        out: output folder
    """
    written = convert_openai_clip(checkpoint, out)
    print(f"wrote {written} (a transformers.CLIPModel folder: use it as data.init_args.clip_model)")
    return written


KINDS = {"clipcap": clipcap, "discritune": discritune, "clip": clip}


def main(argv: list[str]) -> Path:
    """Convert the original projects' checkpoints (ClipCap, DiscriTune, OpenAI CLIP) to clipcap's formats.

    ``clipcap convert KIND --checkpoint FILE --out FOLDER [...]``; returns what it wrote.
    """
    parser = ArgumentParser(prog="clipcap convert", description=summary(main))
    kinds = parser.add_subcommands(dest="kind")
    for name, function in KINDS.items():
        kinds.add_subcommand(
            name, function_parser(function, f"clipcap convert {name}"), help=summary(function)
        )
    config = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return call_with(KINDS[config.kind], config[config.kind])
