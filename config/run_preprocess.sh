#!/usr/bin/env bash
# Preprocess BraTS21 (or ATLAS) NIfTI subjects into 2-D slices (docs/method.md, 'Preprocessing').
# Usage: SOURCE=/path/to/BraTS2021_Training_Data [NAME=brats] [MOD=all] bash config/run_preprocess.sh [extra flags]
# Extra flags go to scripts/preprocess.py (e.g. --shape 128 --out DIR --mask_resize bilinear).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SOURCE="${SOURCE:-}"
NAME="${NAME:-brats}"
MOD="${MOD:-all}"
if [ -z "$SOURCE" ]; then
  echo "error: set SOURCE to the folder with one sub-folder per subject, e.g." >&2
  echo "  SOURCE=/data/BraTS2021_Training_Data bash config/run_preprocess.sh" >&2
  echo "(for ATLAS: SOURCE=... NAME=atlas MOD=t1 bash config/run_preprocess.sh)" >&2
  exit 2
fi
if [ ! -d "$SOURCE" ]; then
  echo "error: SOURCE=$SOURCE is not a directory" >&2
  exit 2
fi
exec python "$REPO/scripts/preprocess.py" --source "$SOURCE" --name "$NAME" --mod "$MOD" "$@"
