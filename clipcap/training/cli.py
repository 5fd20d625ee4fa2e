"""The Lightning wiring of the ``clipcap`` command: ``clipcap fit|validate|test|predict --config
lightning_configs/<x>.yaml [--overrides]`` is a LightningCLI over ``CaptionModule`` and any
``CaptionDataModule``; YAML may use OmegaConf interpolation (``${...}``). :class:`DataOnlyCLI` reads a
training config with the same parser and builds only its datamodule (``clipcap features``).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar as LightningProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import clipcap.objectives  # noqa: F401 - registers the objectives for short names on the command line
from clipcap.checkpoints import read_checkpoint
from clipcap.objectives.base import Objective
from clipcap.training.callbacks import default_progress_bar
from clipcap.training.data import CaptionDataModule
from clipcap.training.module import BUILT_FROM_CONFIG, CaptionModule


def objective_names() -> list[str]:
    """The objectives a config may name by their short class name."""
    return sorted(
        name for name in clipcap.objectives.__all__ if _is_objective(getattr(clipcap.objectives, name))
    )


def _is_objective(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, Objective) and value is not Objective


class ClipcapArgumentParser(LightningArgumentParser):
    """Lightning's parser; a rejected objective is answered with the objectives there are."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if "model.objective" in message:
            message += (
                f"\n  Objectives: {', '.join(objective_names())} (or a full class path such as "
                "clipcap.objectives.CrossEntropy)"
            )
        super().error(message, ex)


class ClipcapCLI(LightningCLI):
    """LightningCLI with clipcap's links between data and model, checks made before any model loads, and
    a closing line saying where a run's files went."""

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

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parses, then resolves and checks ``--ckpt_path`` before Lightning reads the checkpoint's
        hyperparameters (it would give a raw traceback for a truncated file)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        check_a_dataset_is_named(config)
        resolve_ckpt_path(config)

    def before_instantiate_classes(self) -> None:
        """Checks the objective's, the optimizer's and the scheduler's settings before the models load
        (which takes seconds to minutes)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_objective_settings(config)
        check_optimization_settings(config)

    def instantiate_classes(self) -> None:
        """Lightning's instantiation, with the module told it is built from this config (it then saves the
        config as its hyperparameters: :data:`clipcap.training.module.BUILT_FROM_CONFIG`)."""
        token = BUILT_FROM_CONFIG.set(True)
        try:
            super().instantiate_classes()
        finally:
            BUILT_FROM_CONFIG.reset(token)

    def after_fit(self) -> None:
        self._say_where_files_went("fit")

    def after_validate(self) -> None:
        self._say_where_files_went("validate")

    def after_test(self) -> None:
        self._say_where_files_went("test")

    def after_predict(self) -> None:
        self._say_where_files_went("predict")

    def _say_where_files_went(self, stage: str) -> None:
        trainer = self.trainer
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        lines = [f"run folder: {log_dir}"] if log_dir else []
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint) and stage == "fit":
                if callback.best_model_path:
                    lines.append(f"best checkpoint: {callback.best_model_path}")
                if callback.last_model_path:
                    lines.append(f"last checkpoint: {callback.last_model_path}")
            if stage != "fit":  # in fit, each validation's files were listed as they were written
                lines += [f"wrote {path}" for path in getattr(callback, "written", ())]
        for line in lines:
            print(f"[clipcap {stage}] {line}", flush=True)


def check_a_dataset_is_named(config: Namespace) -> None:
    """Refuses configs that name no dataset class: jsonargparse would quietly take the abstract
    ``CaptionDataModule``, and the run would fail later on an unrelated missing option.

    Raises:
        ValueError: saying which data config to give first (a COCO config holds only what it changes).
    """
    data = config.get("data")
    class_path = data.get("class_path") if isinstance(data, Namespace) else None
    if isinstance(class_path, str) and class_path.rsplit(".", 1)[-1] == CaptionDataModule.__name__:
        raise ValueError(
            "the configs name no dataset (data.class_path): a config in lightning_configs/coco/ holds only "
            "what it changes from its dataset's, so give that first, e.g. --config "
            "lightning_configs/data/coco_karpathy.yaml --config lightning_configs/coco/ce.yaml"
        )


def resolve_ckpt_path(config: Namespace) -> None:
    """Turns ``ckpt_path: last`` into the newest ``last*.ckpt`` under ``trainer.default_root_dir`` (the
    shipped configs log to versioned folders, where Lightning would look only in the new, empty one and
    silently start from scratch), and checks that the checkpoint file is readable and safe to load.

    Raises:
        FileNotFoundError: ``last`` and no ``last*.ckpt`` under the root folder, or no such file.
        clipcap.checkpoints.CheckpointError: the file is truncated, corrupt or holds pickled code.
    """
    ckpt_path = config.get("ckpt_path")
    if (
        ckpt_path is None
        or ckpt_path in ("best", "hpc", "registry")
        or str(ckpt_path).startswith("registry:")
    ):
        return
    if ckpt_path == "last":
        root = Path(config.trainer.get("default_root_dir") or os.getcwd())
        found = (
            sorted(root.rglob("last*.ckpt"), key=lambda path: path.stat().st_mtime) if root.is_dir() else []
        )
        if not found:
            raise FileNotFoundError(
                f"--ckpt_path last: no last*.ckpt anywhere under {root} (trainer.default_root_dir), so there is "
                "no run to resume; give the checkpoint's path, or drop --ckpt_path to start a new run"
            )
        ckpt_path = config.ckpt_path = str(found[-1])
        print(f"[clipcap] --ckpt_path last: {ckpt_path}", flush=True)
    read_checkpoint(ckpt_path, "--ckpt_path", mmap=True)


def check_objective_settings(config: Namespace) -> None:
    """Builds the configured objective alone (objectives load nothing when built: their CLIPs and reference
    LMs load at setup), so that a setting it refuses (no reward, a reward weight that is not finite, a group
    advantage with one caption per image) is reported before the models load; and refuses an objective
    whose rewards read reference captions (CIDEr-D) on unlabelled training data.

    Raises:
        ValueError: naming ``model.objective`` and what the objective said.
    """
    model = config.get("model")
    objective_config = model.get("objective") if model is not None else None
    if not _is_class_config(objective_config):
        return
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--objective", type=Objective)
    try:
        parsed = parser.parse_object({"objective": objective_config.clone()})
        objective = parser.instantiate_classes(parsed).objective
    except (ValueError, TypeError) as error:
        raise ValueError(f"model.objective ({objective_config.class_path}): {error}") from None
    data = config.get("data")
    data_args = _init_args(data) if _is_class_config(data) else {}
    if getattr(objective, "needs_references", False) and data_args.get("unlabelled"):
        names = [type(r).__name__ for r in getattr(objective, "rewards", ()) if r.needs_references]
        raise ValueError(
            f"model.objective ({objective_config.class_path}): {', '.join(names)} compares captions with the "
            "images' reference captions, but the training data is unlabelled "
            "(data.init_args.unlabelled=true): serve the references or choose rewards that need none"
        )


def check_optimization_settings(config: Namespace) -> None:
    """Builds the configured optimizer (and scheduler) on one dummy parameter, so that a value they refuse
    (a negative learning rate, betas outside [0, 1), ...) is reported before the models load.

    Raises:
        ValueError: naming the option and what the optimizer or scheduler said.
    """
    model = config.get("model")
    optimizer_config = model.get("optimizer") if model is not None else None
    if not _is_class_config(optimizer_config):
        return
    parameter = torch.nn.Parameter(torch.zeros(1))
    try:
        optimizer = _import(optimizer_config.class_path)([parameter], **_init_args(optimizer_config))
    except ValueError as error:
        raise ValueError(f"model.optimizer ({optimizer_config.class_path}): {error}") from None
    scheduler_config = model.get("lr_scheduler")
    if _is_class_config(scheduler_config):
        try:
            _import(scheduler_config.class_path)(optimizer, **_init_args(scheduler_config))
        except ValueError as error:
            raise ValueError(f"model.lr_scheduler ({scheduler_config.class_path}): {error}") from None


def _is_class_config(value: object) -> bool:
    return isinstance(value, Namespace) and isinstance(value.get("class_path"), str)


def _init_args(value: Namespace) -> dict[str, Any]:
    init_args = value.get("init_args")
    return dict(vars(init_args)) if isinstance(init_args, Namespace) else dict(init_args or {})


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def cli_options(run: bool = True, prog: str | None = None) -> dict[str, Any]:
    """The LightningCLI arguments every clipcap CLI shares (besides ``args`` and ``run``)."""
    parser_kwargs: dict[str, Any] = {"parser_mode": "omegaconf"}
    if not run:
        parser_kwargs["exit_on_error"] = False
    if prog is not None:
        parser_kwargs["prog"] = prog
    return {
        "model_class": CaptionModule,
        "datamodule_class": CaptionDataModule,
        "parser_class": ClipcapArgumentParser,
        "subclass_mode_data": True,
        "auto_configure_optimizers": False,
        "parser_kwargs": parser_kwargs,
        "save_config_kwargs": {"overwrite": True},
    }


def lightning_cli(args: list[str] | None = None, run: bool = True) -> ClipcapCLI:
    """Runs (or, with ``run=False``, only builds) the LightningCLI on ``args``.

    Without ``run`` LightningCLI has no subcommands, so a leading ``fit``/``validate``/... is dropped and
    the rest is parsed and instantiated as that subcommand would.
    """
    if not run and args and args[0] in ClipcapCLI.subcommands():
        args = args[1:]
    return ClipcapCLI(**cli_options(run), args=args, run=run)


def main(argv: list[str]) -> ClipcapCLI:
    """``clipcap fit|validate|test|predict ...``: ``argv`` starts with the subcommand."""
    return lightning_cli(argv)


class DataOnlyCLI(ClipcapCLI):
    """Reads a training config as ``clipcap fit`` does (several ``--config`` files, OmegaConf interpolation,
    dotted overrides such as ``--data.init_args.features_dir=...``), with the options ``add_options``
    declares besides, and builds only its datamodule (``self.datamodule``): the model and the trainer are
    never instantiated, so no weights load.

    The ``data`` and ``trainer`` sections are parsed and checked exactly as ``fit`` parses them; the
    ``model`` section is read as a plain mapping (so a data-only config is enough, and interpolation from
    ``model`` still resolves), since nothing here builds it.
    """

    def __init__(
        self, args: list[str], add_options: Callable[[LightningArgumentParser], None], prog: str
    ) -> None:
        self._add_options = add_options
        super().__init__(
            **cli_options(run=True, prog=prog), seed_everything_default=False, args=args, run=False
        )

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.add_argument("--model", type=dict | None, default=None, help="read, not built")
        parser.add_lightning_class_args(self.datamodule_class, "data", subclass_mode=self.subclass_mode_data)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        self._add_options(parser)  # and no link into the model section, which is not built

    def before_instantiate_classes(self) -> None:
        """No optimizer is built, so its settings are not checked here."""

    def instantiate_classes(self) -> None:
        """The parser's own instantiation: with ``model`` a plain mapping, only the data is a class."""
        self.config_init = self.parser.instantiate_classes(self.config)
        self.datamodule = self.config_init["data"]
