"""Reading checkpoint files without running code from them.

A ``torch.save`` file is a pickle, and unpickling can import and call anything: a checkpoint downloaded
from a stranger can run ``os.system``. Every file clipcap reads (its own checkpoints, ``--model.init_from``,
``clipcap caption --ckpt``, ``clipcap export --ckpt``, the original ClipCap/DiscriTune/EGG files and OpenAI
CLIP ``.pt``) goes through :func:`read_checkpoint`: ``torch.load(weights_only=True)``, which accepts
tensors, plain containers and numbers, plus an explicit allow-list of the original formats' classes
(:data:`ALLOWED_CLASSES`), each rebuilt as a plain named tuple. There is no fallback to full unpickling.

TorchScript archives (OpenAI's CLIP files) are read by ``torch.jit.load``: their code is TorchScript, run by
its interpreter, and only the state dict is kept.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import torch


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read safely: truncated, corrupt, not a checkpoint, or holding
    pickled objects that are not data. The message names the file and says what to do."""


class EggCheckpoint(NamedTuple):
    """Stands in for ``egg.core.callbacks.Checkpoint`` when reading EGG's ``<epoch|final>.tar`` files."""

    epoch: int
    model_state_dict: Any
    optimizer_state_dict: Any
    optimizer_scheduler_state_dict: Any


ALLOWED_CLASSES: list[tuple[type, str]] = [(EggCheckpoint, "egg.core.callbacks.Checkpoint")]
"""Classes of the original formats that may appear in a file, as (stand-in, the name pickled)."""

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def read_checkpoint(path: str | os.PathLike[str], what: str = "checkpoint", mmap: bool = False) -> Any:
    """Reads a checkpoint file without running pickled code.

    Args:
        path: a ``torch.save`` file (a state dict, a Lightning checkpoint, EGG's ``Checkpoint``) or a
            TorchScript archive (OpenAI's CLIP files), whose state dict is returned.
        what: how error messages name the file (``"--ckpt_path"``, ``"model.init_from"``, ...).
        mmap: map the tensors' storage instead of reading it (a cheap check that the whole file is
            readable; TorchScript archives are read in full).

    Returns:
        What was saved, with tensors on the CPU.

    Raises:
        FileNotFoundError: there is no such file.
        IsADirectoryError: ``path`` is a folder.
        CheckpointError: the file is truncated, corrupt or not a checkpoint, or it holds pickled objects
            other than data (refused, never run).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such checkpoint file")
    if _is_torchscript(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated; still reads these
            try:
                return torch.jit.load(str(path), map_location="cpu").state_dict()
            except RuntimeError as error:
                raise CheckpointError(_unreadable(path, what, error)) from None
    try:
        with torch.serialization.safe_globals(ALLOWED_CLASSES):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and _is_zip(path))
    except pickle.UnpicklingError as error:
        found = _GLOBAL.search(str(error))
        pickled_objects = "Unsupported operand" in str(error) and _starts_like_a_pickle(path)
        if found is None and not pickled_objects:
            raise CheckpointError(_unreadable(path, what, error)) from None
        named = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{what} {path}: refused: it holds pickled Python objects{named}, not only tensors and plain "
            "data, and loading them could run code; clipcap never unpickles such files. Where the file comes "
            "from a source you trust, load it where its classes are importable and save its state_dict() "
            "with torch.save."
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile) as error:
        raise CheckpointError(_unreadable(path, what, error)) from None


def _unreadable(path: Path, what: str, error: BaseException) -> str:
    # torch's messages run on for several sentences of advice; the first says what is wrong.
    detail = (
        str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else "the file ends early"
    )
    return (
        f"{what} {path}: not a readable checkpoint (truncated, corrupt, or not written by torch.save; "
        f"{path.stat().st_size} bytes): {detail[:200]}"
    )


def _starts_like_a_pickle(path: Path) -> bool:
    """Whether the file opens with pickle's PROTO opcode (protocol 2 and later), as every ``torch.save``
    file outside a zip archive does; text or random bytes do not."""
    with open(path, "rb") as handle:
        return handle.read(1) == b"\x80"


def _is_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())
    except zipfile.BadZipFile:
        return False
