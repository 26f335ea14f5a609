"""Every entry point ends a malformed command line with one line (``error: ...``, exit 2), not argparse's
usage block; the traceback only with --debug or HAE_FPDM_DEBUG=1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from guided_diffusion.cli import ArgumentParser, UsageError, run_cli

REPO = Path(__file__).resolve().parents[1]

# (script, bad arguments, text the one line must hold)
CASES = [
    ("scripts/translation_FPDM.py", ["--w", "abc"], "argument --w: invalid float value: 'abc'"),
    ("scripts/translation_FPDM_hae_v2.py", ["--forward_steps", "1.5"], "argument --forward_steps"),
    ("scripts/select_guidance.py", ["--forward_steps", "1.5"], "argument --forward_steps"),
    ("scripts/train.py", ["--num_channels", "abc"], "argument --num_channels: invalid int value"),
    ("scripts/train_hae_v2.py", ["--use_checkpoint", "maybe"], "argument --use_checkpoint"),
    ("scripts/train_classifier.py", ["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag"),
    ("scripts/preprocess.py", ["--name", "nope"], "argument --name: invalid choice: 'nope'"),
    ("scripts/make_synthetic_brats.py", ["--subjects", "x"], "argument --subjects: invalid int value"),
    ("scripts/run_main_job.py", ["--seed", "x"], "argument --seed: invalid int value"),
    ("scripts/run_table1.py", ["--preset", "nope"], "argument --preset: invalid choice"),
    ("scripts/compare_denoisers.py", ["--preset", "nope"], "argument --preset: invalid choice"),
    ("scripts/export_model.py", [], "the following arguments are required"),
    ("scripts/plot_anofpdm.py", [], "the following arguments are required: log_dir"),
    ("compare_hae_versions.py", ["--bottleneck_ratio", "x"], "argument --bottleneck_ratio"),
]


def _run(script: str, args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env={**os.environ, **env})


@pytest.mark.parametrize("script,args,text", CASES, ids=[Path(c[0]).stem for c in CASES])
def test_malformed_flags_end_in_one_line(script, args, text):
    proc = _run(script, args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], proc.stderr
    assert "--help" in lines[0] and "usage:" not in proc.stderr


def test_debug_env_shows_the_traceback():
    proc = _run("scripts/make_synthetic_brats.py", ["--subjects", "x"], HAE_FPDM_DEBUG="1")
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr and "UsageError" in proc.stderr


def test_parser_error_raises_usage_error_and_help_still_exits_0(capsys):
    p = ArgumentParser(prog="tool.py")
    p.add_argument("--n", type=int, default=1)
    with pytest.raises(UsageError, match=r"^tool.py: argument --n: invalid int value: 'x'"):
        p.parse_args(["--n", "x"])
    assert run_cli(lambda argv: p.parse_args(argv) and 0, ["--n", "x"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:
        p.parse_args(["--help"])
    assert exit_info.value.code == 0 and "--n" in capsys.readouterr().out
