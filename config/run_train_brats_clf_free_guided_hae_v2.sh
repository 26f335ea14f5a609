#!/usr/bin/env bash
# Train the classifier-free guided HAE UNet V2 (unet_ver hae_v2) on preprocessed BraTS slices:
# config/run_train_brats_clf_free_guided.sh (the paper's flags, docs/method.md, 'Paper configuration', and all its
# environment overrides) with --unet_ver hae_v2 --use_hae True --bottleneck_ratio, run through
# scripts/train_hae_v2.py, with its own defaults:
#   LOG_DIR           ./logs/clf_free_guided_hae_v2
#   BATCH_SIZE        14 (one GPU)
#   MASTER_PORT       12361
#   BOTTLENECK_RATIO  HAE V2 bottleneck MLP ratio, in (0, 1] (default 0.25)
set -euo pipefail
cd "$(dirname "$0")/.."
export LAUNCH_VARIANT=_hae_v2
export LAUNCH_VARIANT_FLAGS="--unet_ver hae_v2 --use_hae True --bottleneck_ratio ${BOTTLENECK_RATIO:-0.25}"
export TRAIN_SCRIPT=scripts/train_hae_v2.py
export BATCH_SIZE="${BATCH_SIZE:-14}" MASTER_PORT="${MASTER_PORT:-12361}"
exec bash config/run_train_brats_clf_free_guided.sh "$@"
