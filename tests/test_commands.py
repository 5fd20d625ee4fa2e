"""The ``clipcap`` command: one table of subcommands, each declared through jsonargparse; ``features`` reads
configs with ``fit``'s parser."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clipcap.commands import COMMANDS, main
from clipcap.commands.parsing import function_parser, summary
from clipcap.training.cli import ClipcapCLI, lightning_cli

CE_CONFIG = "lightning_configs/synthetic/ce.yaml"
LIGHTNING = set(ClipcapCLI.subcommands())


def test_help_lists_every_command_on_one_line(capsys: pytest.CaptureFixture) -> None:
    main(["--help"])
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS)
    for name, (_, what) in COMMANDS.items():
        assert f"  {name.ljust(max(map(len, COMMANDS)) + 2)}{what}" in out.splitlines()
    assert set(COMMANDS) >= LIGHTNING


@pytest.mark.parametrize("name", sorted(set(COMMANDS) - LIGHTNING))
def test_each_command_line_is_its_function_summary(name: str) -> None:
    """The table's line and the command function's docstring cannot drift apart."""
    module = importlib.import_module(COMMANDS[name][0])
    described = summary(module.main) if name == "convert" else summary(getattr(module, name))
    assert COMMANDS[name][1] == described


def test_help_loads_neither_torch_nor_lightning() -> None:
    """What keeps ``clipcap --help`` fast (0.07 s measured, 2026-12-07): no heavy import before a command
    runs."""
    code = (
        "import sys; from clipcap.commands import main; main(['--help']); "
        "print(sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "[]"


def test_an_unknown_command_is_one_line_and_status_1(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["fitt", "--config", CE_CONFIG])
    assert stopped.value.code == 1
    assert capsys.readouterr().err.splitlines()[-1] == "clipcap: unknown command 'fitt'"


def flags(*, grid: bool = False, progress: bool = True, out: Path | None = None, batch_size: int = 4) -> dict:
    """A command.

    Args:
        grid: a flag
        progress: on by default
        out: a folder
        batch_size: a number
    """
    return locals()


def test_bool_parameters_are_flags_and_the_rest_typed_options() -> None:
    parser = function_parser(flags, "flags")
    assert parser.parse_args([]).as_dict() == {"grid": False, "progress": True, "out": None, "batch_size": 4}
    parsed = parser.parse_args(["--grid", "--no_progress", "--out", "x", "--batch_size", "2"])
    assert parsed.as_dict() == {"grid": True, "progress": False, "out": Path("x"), "batch_size": 2}
    assert parser.parse_args(["--grid", "--no_grid"]).grid is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--batch_size", "two"])


def untyped(value, other: int = 1):  # noqa: ANN001 - the point of the test
    """No type."""


def test_an_untyped_parameter_is_refused() -> None:
    with pytest.raises(TypeError, match=r"untyped: parameters without a type: \['value'\]"):
        function_parser(untyped, "untyped")


def test_features_reads_configs_as_fit_does(tiny_world: Path, tmp_path: Path) -> None:
    """Two ``--config`` files (the second overriding the first), OmegaConf interpolation and dotted
    overrides mean the same to ``features`` as to ``fit``."""
    from clipcap.commands.features import build_datamodule
    from clipcap.commands.features import main as features_main

    override = tmp_path / "override.yaml"
    override.write_text(  # interpolation resolves within a file, in fit as here
        "data:\n  init_args:\n    batch_size: 3\n    eval_batch_size: ${data.init_args.batch_size}\n"
    )
    features_dir = f"--data.init_args.features_dir={tmp_path / 'features'}"
    arguments = ["--config", CE_CONFIG, "--config", str(override), features_dir]
    datamodule = build_datamodule(arguments)
    assert Path(datamodule.features_dir) == tmp_path / "features"
    assert datamodule.batch_size == 3 and datamodule.eval_batch_size == 3
    assert (
        datamodule.clip_model
        == yaml.safe_load(Path(CE_CONFIG).read_text())["data"]["init_args"]["clip_model"]
    )
    reports = features_main([*arguments, "--no_progress"])
    assert all(report.complete for report in reports.values()) and (tmp_path / "features" / "val").is_dir()
    fit = lightning_cli(arguments, run=False).datamodule  # as fit builds it, on the features just written
    assert (fit.features_dir, fit.batch_size, fit.eval_batch_size) == (datamodule.features_dir, 3, 3)


def test_the_demo_stage_options_parse(tiny_world: Path) -> None:
    """The demo's stage 1 options, read by fit's parser (a misspelt option would stop `make demo` after
    the first two stages, a quarter of an hour in)."""
    from clipcap.commands.demo import STAGE1_EPOCHS, stage1_options, two_stage_labels
    from clipcap.commands.features import build_datamodule

    labelled = two_stage_labels("lightning_configs/synthetic/gumbel_clip.yaml")
    datamodule = build_datamodule(["--config", CE_CONFIG, *stage1_options(labelled, STAGE1_EPOCHS)])
    assert datamodule.labelled_images == labelled > 0
