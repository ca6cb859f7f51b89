"""A clean install: every asset folder setuptools would take for a package is declared as one, so
building the project prints no "Package ... is absent from the `packages` configuration" warnings."""

import os
import tomllib

from tests.helpers import REPO_ROOT as ROOT


def _importable_asset_folders() -> set[str]:
    """Dotted names of the folders under mixtral_jax holding data, not code, whose path Python could import."""
    found = set()
    for folder, dirs, files in os.walk(os.path.join(ROOT, "mixtral_jax")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        parts = os.path.relpath(folder, ROOT).split(os.sep)
        if "__init__.py" not in files and all(p.isidentifier() for p in parts):
            found.add(".".join(parts))
    return found


def test_asset_folders_are_declared_packages():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        declared = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    folders = _importable_asset_folders()
    assert "mixtral_jax.assets.demo_model" in folders
    assert folders - declared == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    code = {"mixtral_jax"} | {f"mixtral_jax.{d}" for d in os.listdir(os.path.join(ROOT, "mixtral_jax"))
                              if os.path.isfile(os.path.join(ROOT, "mixtral_jax", d, "__init__.py"))}
    stale = {p for p in declared if p.startswith("mixtral_jax.") and p not in code
             and not p.startswith(("mixtral_jax.convert", "mixtral_jax.sharding"))} - folders
    assert stale == set(), "remove these from [tool.setuptools] packages: their folders are gone"


def test_every_code_package_is_declared():
    """A subpackage missing from `packages` would be left out of a wheel (an editable install hides that)."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        declared = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {"mixtral_jax." + d for d in os.listdir(os.path.join(ROOT, "mixtral_jax"))
             if os.path.isfile(os.path.join(ROOT, "mixtral_jax", d, "__init__.py"))}
    assert found and found - declared == set(), "add these to [tool.setuptools] packages in pyproject.toml"
