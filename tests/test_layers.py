"""The layers import downwards only: a short AST walk over every module (function-level imports included).

    kernels < core < variants < eval < conformance, run < train < cli     (harness/__init__.py: the facade)

`LAYERS[x]` lists what layer x may import; nothing may import the CLI. A planted upward import fails
`test_no_upward_imports` with the file, the line and the rule it breaks (`test_planted_upward_import_is_caught`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# layer -> the layers it may import (itself always allowed)
LAYERS: dict[str, set[str]] = {
    "kernels": set(),
    "core": {"kernels"},
    "variants": {"kernels", "core"},
    "eval": {"kernels", "core", "variants"},
    "conformance": {"kernels", "core", "variants"},
    "run": {"kernels", "core", "variants", "eval"},
    "train": {"kernels", "core", "variants", "eval", "run"},
    "cli": {"kernels", "core", "variants", "eval", "conformance", "run", "train"},
    "facade": {"core"},  # harness/__init__.py re-exports the core's public API
}
_HARNESS_LAYERS = ("core", "eval", "conformance", "run", "train")


def layer_of_file(path: Path) -> str | None:
    rel = path.relative_to(ROOT).parts
    if rel[0] in ("kernels", "variants"):
        return rel[0]
    if rel[0] != "harness":
        return None
    if rel[1] == "cli":
        return "cli"
    if rel[1] == "__init__.py":
        return "facade"
    return rel[1] if rel[1] in _HARNESS_LAYERS else None


def layer_of_module(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "varbench" or len(parts) < 2:
        return None
    if parts[1] in ("kernels", "variants"):
        return parts[1]
    if parts[1] != "harness":
        return None
    if len(parts) == 2:
        return "facade"
    return "cli" if parts[2] == "cli" else parts[2] if parts[2] in _HARNESS_LAYERS else None


def _package(path: Path) -> list[str]:
    rel = list(path.relative_to(ROOT).with_suffix("").parts)
    top = {"harness": "varbench.harness", "variants": "varbench.variants", "kernels": "varbench.kernels"}
    names = top[rel[0]].split(".") + rel[1:]
    return names if path.name == "__init__.py" else names[:-1]  # the package a relative import starts from


def imports_of(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in a file, relative ones resolved, nested ones included."""
    tree = ast.parse(source if source is not None else path.read_text())
    package = _package(path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            if not node.module:  # `from . import x`: x is a module too
                found += [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return found


def violations(path: Path, source: str | None = None) -> list[str]:
    own = layer_of_file(path)
    if own is None:
        return []
    out = []
    for line, module in imports_of(path, source):
        target = layer_of_module(module)
        if target is None or target == own:
            continue
        if target not in LAYERS[own]:
            out.append(f"{path.relative_to(ROOT)}:{line}: {own} imports {module} ({target})")
    return out


def _sources() -> list[Path]:
    return sorted(p for folder in ("harness", "variants", "kernels") for p in (ROOT / folder).rglob("*.py"))


def test_every_module_has_a_layer():
    assert [p for p in _sources() if layer_of_file(p) is None] == []


def test_no_upward_imports():
    assert [v for p in _sources() for v in violations(p)] == []


@pytest.mark.parametrize("file, planted", [
    ("variants/var.py", "from varbench.harness.eval.quality import score\n"),
    ("harness/core/loop.py", "def f():\n    import varbench.variants\n"),  # hidden in a function
    ("kernels/reference.py", "from varbench.harness.core import loop\n"),
    ("harness/run/study.py", "from ..cli import main\n"),  # relative, and nothing imports the CLI
    ("harness/eval/tables.py", "from ..run import study\n"),
])
def test_planted_upward_import_is_caught(file, planted):
    path = ROOT / file
    assert violations(path) == []
    assert len(violations(path, path.read_text() + "\n" + planted)) == 1


def test_every_package_folder_is_installed():
    # CI installs the project (not editable): a package folder missing from pyproject's list imports here but
    # not from the installed copy.
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"varbench." + ".".join(p.parent.relative_to(ROOT).parts)
               for top in ("harness", "variants", "kernels") for p in (ROOT / top).rglob("__init__.py")}
    assert folders <= listed, f"not installed (add to pyproject's packages): {sorted(folders - listed)}"
