#!/usr/bin/env bash
# Table 1 (BraTS21) with the paper preset of scripts/run_table1.py: the AnoFPDM model (v2, 128 px, batch
# 64, 210k steps, EMA 0.9999, label dropout 0.1), the comparison models with --unet_ver v1 (AnoDDPM (G) and
# (S) on healthy slices, the learn_sigma model of classifier guidance) and the noise-aware classifier, each
# trained once; AnoFPDM (DDIM / DDPM, S_te) label-free with 600 forward steps of 1000 and the paper's w
# selection on 1,000 validation slices; the comparison rows tuned with pixel labels on the same 1,000
# validation slices; 3 evaluation seeds. table1.md / .csv / .json and fig4_panel.png go to OUT. Training and
# AnoFPDM commands run through torchrun when NPROC > 1 or NNODES > 1 (the AnoFPDM evaluation is sharded);
# the comparison rows run in the launcher's own process. Rerunning continues: trained models and finished
# rows are reused, rows of other settings are refused.
#
# Environment overrides:
#   DATA_DIR     preprocessed data root                         (default ./data/preprocessed_data)
#   OUT          output folder (must be on a shared filesystem with NNODES > 1)
#                                                               (default ./logs/table1_brats)
#   NPROC        processes (GPUs) per node                      (default 1)
#   NNODES       number of nodes; run this launcher on every node with its NODE_RANK   (default 1)
#   NODE_RANK    this node's rank when NNODES > 1               (default 0)
#   MASTER_ADDR  rendezvous host when NNODES > 1                (default 127.0.0.1)
#   MASTER_PORT  rendezvous port                                (default 29503)
#   PYTHON       interpreter                                    (default python)
#   EXTRA_FLAGS  appended to the run_table1.py command line, e.g. "--rows anofpdm_ddim flair --dry_run"
# Exit code 2 with a message when DATA_DIR is not a preprocessed data root.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=config/_launch_common.sh
. config/_launch_common.sh

DATASET="${DATASET:-brats}"
DATA_DIR="${DATA_DIR:-./data/preprocessed_data}"
OUT="${OUT:-./logs/table1_${DATASET}}"
NPROC="${NPROC:-1}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29503}"
PYTHON="${PYTHON:-python}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"

launch_check_data "$DATA_DIR" train val test

LAUNCHER="$PYTHON"
if [ "$NPROC" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
  LAUNCHER="$PYTHON -m torch.distributed.run --nproc-per-node $NPROC --nnodes $NNODES --node-rank $NODE_RANK"
  LAUNCHER="$LAUNCHER --master-addr $MASTER_ADDR --master-port $MASTER_PORT"
fi
# shellcheck disable=SC2206  # EXTRA_FLAGS is meant to be word-split
EXTRA=($EXTRA_FLAGS)

exec "$PYTHON" scripts/run_table1.py --preset paper --dataset "$DATASET" --data_dir "$DATA_DIR" \
  --out "$OUT" --launcher "$LAUNCHER" ${EXTRA[@]+"${EXTRA[@]}"}
