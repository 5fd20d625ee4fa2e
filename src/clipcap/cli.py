"""The ``clipcap`` command.

``clipcap fit|validate|test|predict --config lightning_configs/<x>.yaml [--overrides]`` is a LightningCLI
over ``CaptionModule`` and any ``CaptionDataModule``; YAML may use OmegaConf interpolation (``${...}``).
``clipcap features --config ...`` extracts and caches the config's CLIP image features, ``clipcap caption
--ckpt ... IMAGE...`` captions image files, ``clipcap world``
builds the synthetic world, ``clipcap demo`` runs the main job on it.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar as LightningProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import clipcap.objectives  # noqa: F401 - registers the objectives for short names on the command line
from clipcap.console import quiet_third_party
from clipcap.training.callbacks import default_progress_bar
from clipcap.training.data import CaptionDataModule
from clipcap.training.module import CaptionModule


class ClipcapCLI(LightningCLI):
    """LightningCLI with clipcap's links between data and model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The CLIP feature size is a fact of the cached features; it is never written twice in YAML.
        parser.link_arguments("data.clip_dim", "model.captioner.init_args.clip_dim", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The configured trainer, with the progress bar Lightning would choose but without ``v_num``
        unless the config turns the bar off or names a progress bar of its own."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        wanted = config.get("enable_progress_bar") is not False and "callbacks" not in kwargs
        if wanted and not any(isinstance(callback, LightningProgressBar) for callback in callbacks):
            kwargs["callbacks"] = [*callbacks, default_progress_bar()]
        return super().instantiate_trainer(**kwargs)


def lightning_cli(args: list[str] | None = None, run: bool = True) -> ClipcapCLI:
    """Runs (or, with ``run=False``, only builds) the LightningCLI on ``args``.

    Without ``run`` LightningCLI has no subcommands, so a leading ``fit``/``validate``/... is dropped and
    the rest is parsed and instantiated as that subcommand would.
    """
    if not run and args and args[0] in ClipcapCLI.subcommands():
        args = args[1:]
    return ClipcapCLI(
        CaptionModule,
        CaptionDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        parser_kwargs={"parser_mode": "omegaconf"}
        if run
        else {"parser_mode": "omegaconf", "exit_on_error": False},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


_EXTRA_COMMANDS = {
    "world": "clipcap.synthetic.world:main",
    "demo": "clipcap.demo:main",
    "features": "clipcap.training.features:main",
    "caption": "clipcap.training.caption:main",
    "convert": "clipcap.convert:main",
    "export": "clipcap.export:main",
}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``clipcap`` console script and ``python -m clipcap``."""
    quiet_third_party()
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] in _EXTRA_COMMANDS:
        module_name, function = _EXTRA_COMMANDS[words[0]].split(":")
        module = __import__(module_name, fromlist=[function])
        getattr(module, function)(words[1:])
        return
    if words and words[0] in ("-h", "--help"):
        print("clipcap commands: fit validate test predict (LightningCLI), " + " ".join(_EXTRA_COMMANDS))
    # LightningCLI reads sys.argv itself when given no args (and warns when given both).
    lightning_cli(None if argv is None else words)
