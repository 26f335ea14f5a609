#!/usr/bin/env bash
# Table 1 (ATLAS v2.0): config/run_table1_brats.sh with --dataset atlas: T1 only (1 channel, --modality 0),
# the paper's w = 30 for AnoFPDM, no FLAIR row. Same environment overrides as run_table1_brats.sh
# (DATA_DIR default ./data/preprocessed_data_atlas, OUT default ./logs/table1_atlas).
set -euo pipefail
cd "$(dirname "$0")/.."
export DATASET=atlas
export DATA_DIR="${DATA_DIR:-./data/preprocessed_data_atlas}"
exec bash config/run_table1_brats.sh
