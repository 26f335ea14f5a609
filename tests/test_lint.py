"""The code base stays ruff clean (the configuration lives in pyproject.toml)."""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


def test_ruff_clean():
    ruff = shutil.which("ruff")
    cmd = [ruff] if ruff else [sys.executable, "-m", "ruff"]
    try:
        result = subprocess.run([*cmd, "check", "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        pytest.fail("ruff is not installed: pip install -r requirements.txt")
    assert result.returncode == 0, f"ruff findings:\n{result.stdout}\n{result.stderr}"


# the modules whose job is the command line; everything else takes typed configs and plain values
CLI_MODULES = {"cli.py", "config_flags.py", "training_flags.py", "translation_flags.py"}
MAX_LINES = 500


def _package_files():
    return sorted((REPO / "guided_diffusion").rglob("*.py"))


def _namespace_params(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            params = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
            for a in params:
                if a.annotation is not None and "Namespace" in ast.unparse(a.annotation):
                    found.append(f"{node.name}({a.arg})")
    return found


def test_no_namespace_outside_cli_modules():
    offenders = {}
    for path in _package_files():
        if path.name in CLI_MODULES:
            continue
        found = _namespace_params(ast.parse(path.read_text(encoding="utf-8")))
        if found:
            offenders[str(path.relative_to(REPO))] = found
    assert not offenders, f"functions taking an argparse.Namespace outside the CLI modules: {offenders}"


def test_the_namespace_check_sees_an_annotation():
    tree = ast.parse("import argparse\ndef f(x: int, args: argparse.Namespace) -> None: ...\n")
    assert _namespace_params(tree) == ["f(args)"]


def test_no_package_file_over_the_line_limit():
    long = {str(p.relative_to(REPO)): n for p in _package_files()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines in guided_diffusion/: {long}"


def test_no_sys_path_manipulation():
    statement = re.compile(r"^\s*sys\.path\.(insert|append)\(", re.M)
    hits = [str(p.relative_to(REPO)) for p in REPO.rglob("*.py")
            if ".venv" not in p.parts and statement.search(p.read_text(encoding="utf-8"))]
    assert not hits, f"sys.path.insert in {hits}: the package is installed (pip install -e .)"


def test_import_layers_hold():
    """The import-linter contracts of pyproject.toml (layers, no cycles; docs/architecture.md) hold."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.fail("lint-imports is not installed: pip install -r requirements.txt")
    result = subprocess.run([exe, "--config", str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, f"lint-imports:\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}"


# libraries a module may import inside a function: optional or heavy ones, imported only where used
LAZY_OK = {"monai", "matplotlib", "mpi4py", "scipy", "safetensors", "nibabel", "nilearn", "PIL",
           "torch.utils.tensorboard"}


def test_function_local_imports_only_for_optional_libraries():
    offenders = []
    for path in _package_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in (n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))):
                name = ("." * node.level + (node.module or "")) if isinstance(node, ast.ImportFrom) \
                    else node.names[0].name
                if not any(name == ok or name.startswith(ok + ".") for ok in LAZY_OK):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
    assert not offenders, f"imports inside functions (move them to the module's top): {offenders}"
