"""The architecture the README promises, checked on the source: layers point one way
(data and model at the bottom, then train, rlhf, experiments), no import cycles, no module
that starts a JAX backend when imported, and public functions with type hints."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.run_helpers import REPO, cpu_env

# package -> the packages it may import (itself included)
MAY_IMPORT = {
    "data": {"data"},
    "model": {"model"},
    "train": {"data", "model", "train"},
    "rlhf": {"data", "model", "train", "rlhf"},
    "experiments": {"data", "model", "train", "rlhf", "experiments"},
}


def _modules() -> dict[str, Path]:
    """{dotted name: file} of every module in the layered packages."""
    found = {}
    for package in MAY_IMPORT:
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(tree: ast.AST) -> list[tuple[str, int]]:
    """(module, line) of every absolute import in `tree`; `from pkg import sub` names the
    submodule where `sub` is one, as Python loads it."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def test_layers_point_one_way():
    """Lazy imports inside functions count too: they are dependencies all the same."""
    wrong = []
    for name, path in _modules().items():
        package = name.split(".")[0]
        for imported, line in _imports(ast.parse(path.read_text())):
            top = imported.split(".")[0]
            if top in MAY_IMPORT and top not in MAY_IMPORT[package]:
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_at_module_level():
    modules = _modules()

    def resolve(imported: str) -> str | None:  # the module an import loads, if it is ours
        while imported and imported not in modules:
            imported = imported.rpartition(".")[0]
        return imported or None

    graph = {}
    for name, path in modules.items():
        top_level = ast.Module(body=ast.parse(path.read_text()).body, type_ignores=[])
        top_level.body = [n for n in top_level.body if isinstance(n, ast.Import | ast.ImportFrom)]
        graph[name] = {resolve(m) for m, _ in _imports(top_level)} - {None, name}
        # a package's own __init__ is loaded first whichever submodule is imported
        graph[name] -= {p for p in graph[name] if name.startswith(p + ".")}

    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*path[path.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_importing_the_library_starts_no_jax_backend():
    """A module-level array (`jnp.zeros` at import) would start the backend before
    `jax.distributed.initialize` or `JAX_PLATFORMS` could choose it. The entry points under
    experiments/ define flags at import, so one process takes the library and the configs."""
    names = [n for n in _modules() if not n.startswith("experiments") or ".configs" in n]
    script = (
        "import importlib, json, sys\n"
        "from jax._src import xla_bridge\n"
        "for name in sys.argv[1:]:\n"
        "    importlib.import_module(name)\n"
        "after_imports = xla_bridge.backends_are_initialized()\n"
        "import jax.numpy as jnp\n"
        "jnp.zeros(1)\n"  # the check itself: an array does start one
        "print(json.dumps([after_imports, xla_bridge.backends_are_initialized()]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *names],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    after_imports, after_an_array = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(names) > 80
    assert after_imports is False
    assert after_an_array is True


def _bare_arguments(node: ast.AST, in_class: bool = False) -> list[tuple[int, str, list[str]]]:
    """(line, name, unannotated arguments) of the public functions and methods in `node`."""
    found = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef) and not child.name.startswith("_"):
            found += _bare_arguments(child, in_class=True)
        elif isinstance(child, ast.FunctionDef) and not child.name.startswith("_"):
            args = child.args.posonlyargs + child.args.args + child.args.kwonlyargs
            if in_class and args and args[0].arg in ("self", "cls"):
                args = args[1:]
            bare = [a.arg for a in args if a.annotation is None]
            if bare:
                found.append((child.lineno, child.name, bare))
    return found


def test_public_functions_have_type_hints():
    """Every argument of a public function or method (not `self`/`cls`) is annotated; ruff's
    ANN201 checks the return types."""
    missing = [
        f"{path.relative_to(REPO)}:{line} {function}: {', '.join(bare)}"
        for path in _modules().values()
        for line, function, bare in _bare_arguments(ast.parse(path.read_text()))
    ]
    assert not missing, "\n".join(missing)
