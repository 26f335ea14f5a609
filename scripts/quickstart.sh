#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv (if missing), installs the pinned
# requirements and the package, then runs
#   bash scripts/quickstart.sh demo   the main job on the embedded synthetic dataset
#   bash scripts/quickstart.sh test   the test suite
# Environment: PYTHON (interpreter used to create the venv, default python3.11 or python3),
#              VENV (default .venv), DEMO_OUT (default runs/quickstart).
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-demo}"
shift || true
case "$mode" in
  demo|test) ;;
  *) echo "usage: bash scripts/quickstart.sh [demo|test] [extra args]" >&2; exit 2 ;;
esac

VENV="${VENV:-.venv}"
if [ -z "${PYTHON:-}" ]; then
  if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating virtual environment $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
# Reinstall only when requirements.txt or setup.py changed since the last install.
stamp="$VENV/.hae-fpdm-installed"
want="$(cat requirements.txt setup.py | cksum)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "== installing requirements into $VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r requirements.txt
  "$VENV/bin/python" -m pip install --quiet --no-deps -e .
  echo "$want" > "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"

if [ "$mode" = demo ]; then
  exec python scripts/run_main_job.py --out "${DEMO_OUT:-runs/quickstart}" "$@"
else
  exec python -m pytest -q "$@"
fi
