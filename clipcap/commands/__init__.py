"""The ``clipcap`` command and every subcommand, in one place.

Each subcommand is declared through jsonargparse:

- ``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI's, over ``CaptionModule`` and any
  ``CaptionDataModule`` (:mod:`clipcap.training.cli`);
- ``features`` reads a training config with that same parser (several ``--config`` files, OmegaConf
  interpolation and dotted overrides mean the same to both) and adds its own options;
- ``world``, ``demo``, ``caption``, ``convert`` and ``export`` are typed functions whose parameters and
  docstrings are their options (:mod:`clipcap.commands.parsing`).

A command's module is imported only when the command runs, so ``clipcap --help`` lists the commands
without loading torch or Lightning; ``tests/test_commands.py`` checks that each line below is the first line
of the command function's docstring.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import NoReturn

from clipcap.console import quiet_third_party
from clipcap.errors import NothingLearnt
from clipcap.synthetic.location import names_the_synthetic_world

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module with main(argv), what it does)
    "fit": ("clipcap.training.cli", "Train a captioner from a config (LightningCLI: --config FILE, dotted overrides)"),
    "validate": ("clipcap.training.cli", "Validate a checkpoint on a config's validation split (LightningCLI)"),
    "test": ("clipcap.training.cli", "Test a checkpoint on a config's test split: captions, metrics, report (LightningCLI)"),
    "predict": ("clipcap.training.cli", "Caption a config's predict split with a checkpoint (LightningCLI)"),
    "features": ("clipcap.commands.features", "Extract and cache the frozen-CLIP image features of a training config's dataset"),
    "caption": ("clipcap.commands.caption", "Caption image files with a trained checkpoint"),
    "export": ("clipcap.commands.export", "Export a trained captioner from a checkpoint as safetensors, peft adapters and Hugging Face folders"),
    "convert": ("clipcap.commands.convert", "Convert the original projects' checkpoints (ClipCap, DiscriTune, OpenAI CLIP) to clipcap's formats"),
    "world": ("clipcap.commands.world", "Build the synthetic world: images, captions, a tiny CLIP, a tiny LM and CLIP features"),
    "demo": ("clipcap.commands.demo", "Run the main job end to end on the synthetic world and print the metrics"),
}  # fmt: skip

TRACEBACK_VARIABLE = "CLIPCAP_TRACEBACK"
"""Set it (to anything) to see the full traceback of an error the command otherwise gives in one line."""


def usage() -> str:
    """``clipcap --help``: every command with one line saying what it does."""
    width = max(map(len, COMMANDS)) + 2
    lines = [
        "usage: clipcap COMMAND [options]   (clipcap COMMAND --help lists a command's options)",
        "",
        "commands:",
        *(f"  {name:<{width}}{what}" for name, (_, what) in COMMANDS.items()),
        "",
        f"An expected failure ends with one line on stderr and status 1; {TRACEBACK_VARIABLE}=1 shows the traceback.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``clipcap`` console script and ``python -m clipcap``.

    An expected failure (a missing, unreadable or unsafe file, a permission, an invalid value, a run that
    learnt nothing) ends the command with one line on stderr and exit status 1.
    """
    words = list(sys.argv[1:] if argv is None else argv)
    if not words or words[0] in ("-h", "--help"):
        print(usage())
        return
    command, options = words[0], words[1:]
    if command not in COMMANDS:
        print(usage(), file=sys.stderr)
        fail("", ValueError(f"unknown command {command!r}"))
    quiet_third_party()
    try:
        if command != "world" and names_the_synthetic_world(options):
            # The world is built here, never on resolving a name; imported here to keep --help light.
            from clipcap.synthetic.world import ensure_world

            ensure_world()
        module = importlib.import_module(COMMANDS[command][0])
        module.main(words if module.__name__ == "clipcap.training.cli" else options)
    except (OSError, ValueError, NothingLearnt) as error:
        fail(command, error)
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Destroys the DDP process group a run set up (Lightning leaves it for reuse): left to interpreter
    exit, its threads were seen to abort the process ("terminate called without an active exception",
    torch 2.11, gloo) after a run that had succeeded."""
    torch = sys.modules.get("torch")  # a command that never loaded torch has no process group
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def fail(command: str, error: BaseException) -> NoReturn:
    """Ends the command with ``clipcap <command>: <what went wrong>`` and status 1 (the traceback too when
    ``CLIPCAP_TRACEBACK`` is set)."""
    if os.environ.get(TRACEBACK_VARIABLE):
        traceback.print_exception(error)
    print(f"clipcap {command}: {describe_error(error)}".replace("clipcap : ", "clipcap: "), file=sys.stderr)
    raise SystemExit(1) from None


def describe_error(error: BaseException) -> str:
    """One line for an expected error: an OS error as ``<what>: <file>``, anything else as its message."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        where = f"{error.filename} -> {error.filename2}" if error.filename2 else str(error.filename)
        return f"{error.strerror}: {where}"
    return str(error).strip() or type(error).__name__
