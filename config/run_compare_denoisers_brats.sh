#!/usr/bin/env bash
# Denoiser comparison (v2, hae, hae_lite, hae_v2 and the ablations hae_skeleton, hae_v2_b0.5, hae_v2_b1.0)
# on preprocessed BraTS21 with the paper preset of scripts/compare_denoisers.py: each network trained with
# each training seed (TRAIN_SEEDS) with the paper's flags (128 px, batch 64, 210k steps, EMA 0.9999, label
# dropout 0.1), segmented with AnoFPDM label-free (600 forward steps of 1000, several w, the paper's
# selection rule on 1,000 validation slices) with 3 evaluation seeds, the cost measured side by side;
# table.md / table.csv / table.json (mean ± std over the training seeds) and the plots go to OUT. Every training and evaluation command
# runs through torchrun when NPROC > 1 or NNODES > 1 (the evaluation is sharded over all processes).
# Rerunning continues: trained models and finished rows are reused, rows of other settings are refused.
#
# Environment overrides:
#   DATA_DIR     preprocessed data root                         (default ./data/preprocessed_data)
#   OUT          output folder (must be on a shared filesystem with NNODES > 1)
#                                                               (default ./logs/compare_denoisers_brats)
#   NPROC        processes (GPUs) per node                      (default 1)
#   NNODES       number of nodes; run this launcher on every node with its NODE_RANK   (default 1)
#   NODE_RANK    this node's rank when NNODES > 1               (default 0)
#   MASTER_ADDR  rendezvous host when NNODES > 1                (default 127.0.0.1)
#   MASTER_PORT  rendezvous port                                (default 29502)
#   PYTHON       interpreter                                    (default python)
#   TRAIN_SEEDS  training seeds, one model per (row, seed)      (default "0 1 2")
#   ROWS         table rows                  (default "v2 hae hae_lite hae_v2 hae_skeleton hae_v2_b0.5 hae_v2_b1.0")
#   EXTRA_FLAGS  appended to the compare_denoisers.py command line, e.g. "--rows v2 hae_v2 --dry_run"
# Exit code 2 with a message when DATA_DIR is not a preprocessed data root.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=config/_launch_common.sh
. config/_launch_common.sh

DATA_DIR="${DATA_DIR:-./data/preprocessed_data}"
OUT="${OUT:-./logs/compare_denoisers_brats}"
NPROC="${NPROC:-1}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29502}"
PYTHON="${PYTHON:-python}"
TRAIN_SEEDS="${TRAIN_SEEDS:-0 1 2}"
ROWS="${ROWS:-v2 hae hae_lite hae_v2 hae_skeleton hae_v2_b0.5 hae_v2_b1.0}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"

launch_check_data "$DATA_DIR" train val test

LAUNCHER="$PYTHON"
if [ "$NPROC" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
  LAUNCHER="$PYTHON -m torch.distributed.run --nproc-per-node $NPROC --nnodes $NNODES --node-rank $NODE_RANK"
  LAUNCHER="$LAUNCHER --master-addr $MASTER_ADDR --master-port $MASTER_PORT"
fi
# shellcheck disable=SC2206  # these lists are meant to be word-split
SEEDS=($TRAIN_SEEDS)
# shellcheck disable=SC2206
ROW_NAMES=($ROWS)
# shellcheck disable=SC2206
EXTRA=($EXTRA_FLAGS)

exec "$PYTHON" scripts/compare_denoisers.py --preset paper --data_dir "$DATA_DIR" --out "$OUT" \
  --launcher "$LAUNCHER" --train_seeds "${SEEDS[@]}" --rows "${ROW_NAMES[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
