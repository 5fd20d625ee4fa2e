"""The package's shape: no import cycle among clipcap's modules, and name resolution that builds nothing."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from clipcap.pretrained import resolve_pretrained

PACKAGE = Path(__file__).resolve().parents[1] / "clipcap"


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module → the clipcap modules it imports, counting imports inside functions and the parent packages
    Python imports first (``import clipcap.clip.encoder`` runs ``clipcap/clip/__init__.py``)."""
    root = package.parent
    modules: dict[str, Path] = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package_name = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package_name.split(".")[: len(package_name.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                found = known(target) if target.split(".")[0] == package.name else None
                if found is None or found == name:
                    continue
                pieces = found.split(".")
                for end in range(1, len(pieces) + 1):
                    imported = ".".join(pieces[:end])
                    if imported in modules and imported != name and not name.startswith(imported + "."):
                        graph[name].add(imported)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in sorted(graph[module]):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_clipcap_modules_form_no_import_cycle() -> None:
    graph = import_graph(PACKAGE)
    assert len(graph) > 50 and "clipcap.synthetic.location" in graph["clipcap.pretrained"]
    assert cycles(graph) == []


def test_the_check_finds_a_cycle_added_by_hand(tmp_path: Path) -> None:
    """The name resolver importing the world builder again (the cycle there was), inside a function."""
    copy = tmp_path / "clipcap"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    resolver = copy / "pretrained.py"
    resolver.write_text(
        resolver.read_text() + "\n\ndef _build():\n    from clipcap.synthetic.world import ensure_world\n"
    )
    (found,) = cycles(import_graph(copy))
    assert {"clipcap.pretrained", "clipcap.synthetic.world", "clipcap.clip.encoder"} <= set(found)


def test_resolving_a_synthetic_name_builds_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    world = tmp_path / "no-world-here"
    monkeypatch.setenv("CLIPCAP_WORLD", str(world))
    with pytest.raises(
        FileNotFoundError, match=r"'synthetic:lm' names a part of the synthetic world.*`clipcap world`"
    ):
        resolve_pretrained("synthetic:lm")
    assert not world.exists() and list(tmp_path.iterdir()) == []
    assert resolve_pretrained("gpt2") == "gpt2"


def test_the_entry_point_builds_the_world_when_its_arguments_name_it(tmp_path: Path) -> None:
    from clipcap.synthetic.location import names_the_synthetic_world

    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n  captioner:\n    init_args:\n      language_model: {init_args: {pretrained: gpt2}}\n"
    )
    assert not names_the_synthetic_world(["fit", "--config", str(config)])
    assert names_the_synthetic_world(["fit", "--config", str(config), "--model.x=synthetic:lm"])
    config.write_text("data:\n  class_path: clipcap.training.SyntheticCaptions\n")
    assert names_the_synthetic_world(["fit", f"--config={config}"])
