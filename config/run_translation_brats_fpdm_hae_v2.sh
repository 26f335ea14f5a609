#!/usr/bin/env bash
# AnoFPDM evaluation of a classifier-free guided HAE UNet V2 (unet_ver hae_v2) on preprocessed BraTS slices:
# config/run_translation_brats_fpdm.sh (the paper's flags, docs/method.md, 'Paper configuration', and all its
# environment overrides) with --unet_ver hae_v2 --use_hae True --bottleneck_ratio, run through
# scripts/translation_FPDM_hae_v2.py, with its own defaults:
#   MODEL_DIR         ./logs/clf_free_guided_hae_v2 (the output of config/run_train_brats_clf_free_guided_hae_v2.sh)
#   LOG_DIR           ./logs/translation_fpdm_hae_v2_<W>_<MODEL_NUM>_600
#   BATCH_SIZE / BATCH_SIZE_VAL   10 / 10
#   MASTER_PORT       12363
#   BOTTLENECK_RATIO  HAE V2 bottleneck MLP ratio; must match training (default 0.25)
set -euo pipefail
cd "$(dirname "$0")/.."
export LAUNCH_VARIANT=_hae_v2
export LAUNCH_VARIANT_FLAGS="--unet_ver hae_v2 --use_hae True --bottleneck_ratio ${BOTTLENECK_RATIO:-0.25}"
export TRANSLATION_SCRIPT=scripts/translation_FPDM_hae_v2.py
export TRAIN_LAUNCHER=config/run_train_brats_clf_free_guided_hae_v2.sh
export BATCH_SIZE="${BATCH_SIZE:-10}" BATCH_SIZE_VAL="${BATCH_SIZE_VAL:-10}" MASTER_PORT="${MASTER_PORT:-12363}"
exec bash config/run_translation_brats_fpdm.sh "$@"
