"""Atomic writes: a temporary file (or folder) beside the target, complete before it is renamed into place.

A crash or an error while writing never leaves a half-written file or folder under the final name, and a
reader sees either the old one or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np


def _atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    target = Path(path)
    temporary = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically; returns the path."""
    return _atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Writes UTF-8 ``text`` to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], content: Any, indent: int | None = None) -> Path:
    """Writes ``content`` as JSON (no NaN, non-ASCII kept) to ``path`` atomically; returns the path.

    The text is serialised before the file is opened, so unserialisable content leaves nothing behind.
    """
    text = json.dumps(content, indent=indent, allow_nan=False, ensure_ascii=False) + "\n"
    return atomic_write_text(path, text)


def atomic_save_npy(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Saves ``array`` as ``.npy`` (never pickled) to ``path`` atomically; returns the path."""
    contiguous = np.ascontiguousarray(array)
    return _atomic_write(path, lambda handle: np.save(handle, contiguous, allow_pickle=False))


def replace_folder(staging: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Renames the complete folder ``staging`` to ``target``, replacing a folder already there.

    ``os.rename`` cannot replace a non-empty folder, so an existing ``target`` steps aside first (as
    ``.<name>.old-*``) and comes back if the second rename fails; it is deleted only once the new folder is
    in place. If the process dies between the two renames the old folder survives beside the target.
    """
    staging, target = Path(staging), Path(target)
    if not target.exists():
        os.rename(staging, target)
        return
    retired = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, retired)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


@contextmanager
def staged_folder(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a fresh folder beside ``target`` to write into; renamed to ``target`` when the block ends
    without error, deleted when it raises. ``target`` must not exist yet (or be an empty folder): a
    command's output folder never silently replaces something the user had there."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not empty; choose a new output folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        target.rmdir()
    os.rename(staging, target)
