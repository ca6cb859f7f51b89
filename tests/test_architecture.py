"""The import graph points one way (the layering docs/architecture.md draws), and the code stays lint clean.

Read from the source with `ast`, so a cycle or an upward import fails here even where Python would
happen to import it in a lucky order.
"""

from __future__ import annotations

import ast
import fnmatch
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT as ROOT

PACKAGE_DIRS = {"mixtral_jax": "mixtral_jax", "mixtral_jax.convert": "convert", "mixtral_jax.sharding": "sharding"}
SUBPACKAGES = ("kernels", "text", "model", "loading", "inference", "serving", "training", "planning", "cli")
PACKAGE_DIRS.update({f"mixtral_jax.{p}": f"mixtral_jax/{p}" for p in SUBPACKAGES})

# Bottom to top, one folder a layer: a module may import modules of its own layer or below, never above.
# Two modules of model/ sit below sharding/: the expert-parallel dispatch (sharding/expert_parallel.py) is
# built from the MoE's routing and the int8 weights. docs/architecture.md draws the same table.
LAYERS = [
    ("foundation", ["mixtral_jax.errors", "mixtral_jax.version", "mixtral_jax.progress", "mixtral_jax.config",
                    "mixtral_jax.kernels", "mixtral_jax.kernels.*"]),
    ("text", ["mixtral_jax.text", "mixtral_jax.text.*"]),
    ("model primitives", ["mixtral_jax.model.quant", "mixtral_jax.model.moe"]),
    ("sharding", ["mixtral_jax.sharding", "mixtral_jax.sharding.*"]),
    ("model", ["mixtral_jax.model", "mixtral_jax.model.*"]),
    ("convert", ["mixtral_jax.convert", "mixtral_jax.convert.*"]),
    ("loading", ["mixtral_jax.loading", "mixtral_jax.loading.*"]),
    ("inference and training", ["mixtral_jax.inference", "mixtral_jax.inference.*",
                                "mixtral_jax.training", "mixtral_jax.training.*"]),
    ("planning", ["mixtral_jax.planning", "mixtral_jax.planning.*"]),
    ("serving", ["mixtral_jax.serving", "mixtral_jax.serving.*"]),
    ("cli", ["mixtral_jax.cli", "mixtral_jax.cli.*"]),
    ("package", ["mixtral_jax"]),
]
# imported inside functions on purpose: heavy, or optional extras
# fastapi/starlette/uvicorn/llguidance/prometheus_client: the optional `serve` extra, so the CLI (which registers
# `serve`) runs without it
LAZY_ALLOWED = ("torch", "orbax", "fastapi", "starlette", "uvicorn", "llguidance", "prometheus_client")


def _modules() -> dict[str, str]:
    out = {}
    for package, folder in PACKAGE_DIRS.items():
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if name.endswith(".py"):
                module = package if name == "__init__.py" else f"{package}.{name[:-3]}"
                out[module] = os.path.join(ROOT, folder, name)
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    """The layer naming `module` exactly, else the first whose pattern matches it."""
    for rank, (_, patterns) in enumerate(LAYERS):
        if module in patterns:
            return rank
    for rank, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return rank
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: add it (and to docs/architecture.md)")


def _imports(module: str, path: str):
    """(target module, line, at module level?) for each import of one of ours, and the other lazy imports."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    # module level includes a guarded import (`try: import x` / `except ImportError:` at the top of a file)
    guarded = [n for t in tree.body if isinstance(t, ast.Try) for n in t.body + sum((h.body for h in t.handlers), [])]
    top_level = {id(n) for n in tree.body + guarded}
    ours, lazy_other = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            names = [(base, a.name) for a in node.names]
        else:
            continue
        for base, name in names:
            target = f"{base}.{name}" if name and f"{base}.{name}" in MODULES else base
            if target.split(".")[0] == "mixtral_jax" and base != "__future__":
                ours.append((target, node.lineno, id(node) in top_level))
            elif id(node) not in top_level:
                lazy_other.append((base, node.lineno))
    return ours, lazy_other


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_every_package_folder_is_listed():
    """A new folder of modules under mixtral_jax/ joins a layer (and pyproject's packages) on purpose."""
    found = {f"mixtral_jax.{d}" for d in os.listdir(os.path.join(ROOT, "mixtral_jax"))
             if os.path.isfile(os.path.join(ROOT, "mixtral_jax", d, "__init__.py"))}
    assert found - {"mixtral_jax.assets"} == {f"mixtral_jax.{p}" for p in SUBPACKAGES}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    ours, lazy_other = GRAPH[module]
    for target, line, top in ours:
        assert target in MODULES, f"{module}:{line} imports {target}, which does not exist"
        assert top, f"{module}:{line} imports {target} inside a function: move it to the top of the file"
        assert _layer(target) <= _layer(module), (
            f"{module}:{line} imports {target}, a layer above it ({LAYERS[_layer(target)][0]} over "
            f"{LAYERS[_layer(module)][0]})")
    for base, line in lazy_other:
        assert base.split(".")[0] in LAZY_ALLOWED, (
            f"{module}:{line} imports {base} inside a function; only {', '.join(LAZY_ALLOWED)} are imported lazily")


def test_no_import_cycles():
    edges = {m: {t for t, _, _ in GRAPH[m][0] if t != m} for m in MODULES}
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for t in sorted(edges[m]):
            # a package's __init__ runs before its submodules: importing the package from one of its own
            # submodules is the edge that breaks, so it counts like any other
            visit(t)
        path.pop()
        done.add(m)

    for m in sorted(MODULES):
        visit(m)


@pytest.mark.parametrize("first", ["mixtral_jax.sharding.expert_parallel", "mixtral_jax.convert.keymap",
                                   "mixtral_jax.model.placement", "mixtral_jax.cli.main"])
def test_imports_in_a_fresh_interpreter_whatever_comes_first(first):
    code = ("import importlib, sys\n"
            f"importlib.import_module({first!r})\n"
            f"for m in {sorted(m for m in MODULES if not m.endswith('__main__'))!r}:\n"
            "    importlib.import_module(m)\n"
            "from mixtral_jax.sharding import *\n"
            "from mixtral_jax.convert import *\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_ruff_is_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", ROOT], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
