"""Command-line options from typed functions, through jsonargparse.

A command is a plain function: its parameters, their annotations, defaults and Google-style docstring are
its options, their types and their help (as ``jsonargparse.CLI`` and litgpt's ``__main__`` read them). Two
additions to what ``add_function_arguments`` does: a ``bool`` parameter is a flag (``--grid``, and
``--no_grid`` to turn it off), as the commands' flags were before they were declared this way, and a
``list[str]`` parameter may be named positional (``clipcap caption IMAGE...``).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterable
from typing import Any

import docstring_parser
from jsonargparse import ActionYesNo, ArgumentParser, Namespace


def summary(function: Callable[..., Any]) -> str:
    """The first line of a function's docstring: what its command does, in the command list."""
    return inspect.getdoc(function).splitlines()[0].rstrip(".")


def add_function_options(
    parser: ArgumentParser,
    function: Callable[..., Any],
    positional: Iterable[str] = (),
    skip: Iterable[str] = (),
) -> list[str]:
    """Adds one option per parameter of ``function`` (except ``skip``) to ``parser``; returns their names.

    Raises:
        TypeError: a parameter has no annotation (an option must have a type).
    """
    positional, skip = set(positional), set(skip)
    hints = typing.get_type_hints(function)
    helps = {
        item.arg_name: item.description for item in docstring_parser.parse(function.__doc__ or "").params
    }
    parameters = inspect.signature(function).parameters
    names = [name for name in parameters if name not in skip]
    untyped = [name for name in names if name not in hints]
    if untyped:
        raise TypeError(f"{function.__qualname__}: parameters without a type: {untyped}")
    flags = [name for name in names if hints[name] is bool]
    for name in flags:
        default = parameters[name].default
        parser.add_argument(
            f"--{name}",
            action=ActionYesNo(no_prefix="no_"),
            default=bool(default) if default is not inspect.Parameter.empty else False,
            help=helps.get(name),
        )
    for name in positional:  # one or more values; none when the parameter has a default
        optional = parameters[name].default is not inspect.Parameter.empty
        parser.add_argument(name, nargs="*" if optional else "+", type=str, help=helps.get(name))
    parser.add_function_arguments(
        function, skip=skip | positional | set(flags), as_group=False, fail_untyped=True
    )
    return names


def function_parser(
    function: Callable[..., Any], prog: str, positional: Iterable[str] = (), skip: Iterable[str] = ()
) -> ArgumentParser:
    """A parser whose options are ``function``'s parameters; its description is the docstring's summary."""
    parser = ArgumentParser(prog=prog, description=inspect.getdoc(function).split("\n\nArgs:")[0])
    add_function_options(parser, function, positional, skip)
    return parser


def call_with(function: Callable[..., Any], config: Namespace, **more: Any) -> Any:
    """Calls ``function`` with the options of ``config`` that are its parameters (plus ``more``)."""
    parameters = inspect.signature(function).parameters
    values = {name: config[name] for name in parameters if name in config and name not in more}
    return function(**values, **more)


def run_function(
    function: Callable[..., Any], argv: list[str], prog: str, positional: Iterable[str] = ()
) -> Any:
    """Parses ``argv`` as ``function``'s options and calls it."""
    parser = function_parser(function, prog, positional)
    return call_with(function, parser.parse_args(argv))
