"""The import graph of the project, read with ``ast`` (nothing is imported): no cycles, and the
library (``colld_ds`` with ``colld_ds.kernels``, without its commands and ``colld_ds.data_prep``)
imports only the library."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("colld_ds", "kernels", "data_prep", "benchmarks", "tests")   # folders
MAPPED = {"kernels": "colld_ds.kernels", "data_prep": "colld_ds.data_prep"}  # pyproject package-dir
PREP = "colld_ds.data_prep"
COMMANDS = {"colld_ds.train", "colld_ds.evaluate", "colld_ds.export", "colld_ds.compare",
            "colld_ds.demo", "colld_ds.cli"}
# Imported inside functions on purpose: the CLIs load a command's modules when it runs (so
# `--help` loads no torch), and colld_ds.kernels.contrastive needs triton, an optional dependency.
LAZY_IMPORTERS = {"colld_ds.cli", "colld_ds.data_prep.cli"}
LAZY_IMPORTED = {"colld_ds.kernels.contrastive"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    if parts[0] == "tests":                     # tests import one another by bare name
        parts = parts[1:]
    if parts[0] in MAPPED:
        parts = (MAPPED[parts[0]], *parts[1:])
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def is_prep(name: str) -> bool:
    return name == PREP or name.startswith(PREP + ".")


def is_library(name: str) -> bool:
    return name.split(".")[0] == "colld_ds" and name not in COMMANDS and not is_prep(name)


def imports(name: str) -> list[tuple[str, bool]]:
    """(project module imported, whether inside a function) for every import in ``name``."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            targets = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1]
                                    + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                           for alias in child.names]
            found.extend((target, inside) for target in targets if target in MODULES)
            visit(child, inside)

    visit(tree, False)
    return found


GRAPH = {name: imports(name) for name in MODULES}


def test_the_graph_is_read():
    assert ("colld_ds.distill", False) in GRAPH["colld_ds.train"]
    assert ("colld_ds.formats", False) in GRAPH["colld_ds.data"]


def test_no_import_cycles():
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target, _ in GRAPH[name]:
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("name", sorted(n for n in MODULES if is_library(n)))
def test_the_library_imports_only_the_library(name):
    outside = sorted({target for target, _ in GRAPH[name] if not is_library(target)})
    assert not outside, f"{name} imports {outside}: commands, {PREP}, benchmarks or tests"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if is_prep(n)))
def test_data_prep_imports_the_library_and_itself_only(name):
    outside = sorted({target for target, _ in GRAPH[name]
                      if not (is_library(target) or is_prep(target))})
    assert not outside, f"{name} imports {outside}"


def test_project_imports_are_at_module_top():
    lazy = sorted(f"{name} imports {target}" for name, found in GRAPH.items()
                  if name not in LAZY_IMPORTERS for target, inside in found
                  if inside and target not in LAZY_IMPORTED)
    assert not lazy, "imports inside functions: " + "; ".join(lazy)
