"""``clipcap export``: a trained captioner out of a Lightning checkpoint (:mod:`clipcap.export`)."""

from __future__ import annotations

from pathlib import Path

import torch

from clipcap.commands.parsing import run_function
from clipcap.export import export_checkpoint


def export(ckpt: str, out: str, merged: bool = False) -> Path:
    """Export a trained captioner from a checkpoint as safetensors, peft adapters and Hugging Face folders.

    Args:
        ckpt: a checkpoint written by ``clipcap fit``
        out: the export folder to create
        merged: also write the LoRA-merged LM

    Returns:
        The export folder.
    """
    with torch.no_grad():
        folder = export_checkpoint(ckpt, out, merged=merged)
    print(f"[export] wrote {folder}: " + ", ".join(sorted(p.name for p in folder.iterdir())))
    return folder


def main(argv: list[str]) -> Path:
    return run_function(export, argv, "clipcap export")
