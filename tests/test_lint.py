"""The code base stays ruff clean (the configuration lives in pyproject.toml)."""

import ast
import re
import shutil
import subprocess
import sys

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
