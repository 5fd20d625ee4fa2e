"""``clipcap export``: a trained captioner out of a Lightning checkpoint, in formats other tools read.

The export folder holds:

- ``captioner.json``: the captioner's config (class paths and options, as the training YAML gave them);
- ``mapper.safetensors``: the mapper's weights;
- ``adapter/``: with LoRA, the adapters in peft's own format (``adapter_config.json`` and
  ``adapter_model.safetensors``), loadable with ``peft.PeftModel.from_pretrained(base, folder)``;
- ``lm/``: with a finetuned LM, the whole LM and its tokenizer as a Hugging Face folder;
- ``merged_lm/`` (``--merged``, LoRA only): the base with the adapters merged in, a plain Hugging Face
  folder that needs neither peft nor the base checkpoint.

A frozen LM (or LoRA's base) is named, not copied. :func:`load_exported` rebuilds the captioner from the
folder. The folder is written under a temporary name and renamed when complete, so an interrupted export
leaves no half-written folder behind.

The command is ``clipcap export --ckpt run/checkpoints/best.ckpt --out exported/ [--merged]``
(:mod:`clipcap.commands.export`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser
from peft import set_peft_model_state_dict
from peft.utils import load_peft_weights
from safetensors.torch import load_file, save_file

from clipcap.captioner import ClipCaptioner
from clipcap.checkpoints import read_checkpoint
from clipcap.files import staged_folder
from clipcap.training.module import CaptionModule

CONFIG_FILE = "captioner.json"
MAPPER_FILE = "mapper.safetensors"


def export_checkpoint(checkpoint: str | Path, out: str | Path, merged: bool = False) -> Path:
    """Writes the export folder ``out`` for the captioner in a Lightning checkpoint.

    Args:
        checkpoint: a checkpoint written by ``clipcap fit``.
        out: the folder to create; it must not exist yet.
        merged: also write the LoRA-merged LM (``merged_lm/``).

    Returns:
        ``out``.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"--out {out} exists; choose a new folder")
    saved = read_checkpoint(checkpoint, "--ckpt")
    config = saved.get("hyper_parameters", {}).get("captioner")
    if not isinstance(config, dict) or "class_path" not in config:
        raise ValueError(f"{checkpoint} holds no captioner config (it was not written by `clipcap fit`)")
    module = CaptionModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    captioner = module.captioner
    if not isinstance(captioner, ClipCaptioner):
        raise ValueError(f"only ClipCaptioner exports, {checkpoint} has {type(captioner).__name__}")
    lm = captioner.lm
    if merged and lm.lora is None:
        raise ValueError(f"--merged: the LM in {checkpoint} has no LoRA adapters to merge")
    with staged_folder(out) as staging:
        save_file(
            {k: v.contiguous() for k, v in captioner.mapper.state_dict().items()}, staging / MAPPER_FILE
        )
        if lm.lora is not None:
            lm.model.save_pretrained(staging / "adapter")
        if lm.trainable:
            lm.model.save_pretrained(staging / "lm")
            lm.tokenizer.save_pretrained(staging / "lm")
            _lm_args(config)["pretrained"] = "lm"  # relative to the folder
        if merged:
            merged_model = copy.deepcopy(lm.model).merge_and_unload()
            merged_model.save_pretrained(staging / "merged_lm")
            lm.tokenizer.save_pretrained(staging / "merged_lm")
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_exported(folder: str | Path, merged: bool = False) -> ClipCaptioner:
    """Rebuilds the captioner of an export folder.

    Args:
        folder: written by :func:`export_checkpoint`.
        merged: use ``merged_lm/`` (no peft adapters) instead of the base plus ``adapter/``.
    """
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a clipcap export folder: it has no {CONFIG_FILE}")
    config = json.loads(config_path.read_text())
    lm_args = _lm_args(config)
    if lm_args.get("pretrained") == "lm":
        lm_args["pretrained"] = str(folder / "lm")
    if merged:
        if not (folder / "merged_lm").is_dir():
            raise FileNotFoundError(f"{folder} has no merged_lm/: export it with --merged")
        lm_args.update(pretrained=str(folder / "merged_lm"), lora=None, quantization=None)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--captioner", type=ClipCaptioner)
    captioner: ClipCaptioner = parser.instantiate_classes(
        parser.parse_object({"captioner": config})
    ).captioner
    captioner.mapper.load_state_dict(load_file(folder / MAPPER_FILE))
    if captioner.lm.lora is not None:
        set_peft_model_state_dict(
            captioner.lm.model, load_peft_weights(str(folder / "adapter"), device="cpu")
        )
    return captioner.eval()


def _lm_args(config: dict[str, Any]) -> dict[str, Any]:
    return config["init_args"]["language_model"].setdefault("init_args", {})
