#!/usr/bin/env bash
# Train the classifier-free guided FPDM UNet (unet_ver v2) on preprocessed BraTS slices with the paper's
# flags (anofpdm_spec.md 6.1). Runs on a laptop (one process, CPU or one GPU) and on a cluster (torchrun).
#
# Environment overrides:
#   DATA_DIR     preprocessed data root                          (default ./data/preprocessed_data)
#   LOG_DIR      log/checkpoint dir, exported as OPENAI_LOGDIR   (default ./logs/clf_free_guided)
#   NPROC        processes (GPUs) per node                       (default 1)
#   NNODES       number of nodes                                 (default 1)
#   NODE_RANK    this node's rank when NNODES > 1                (default 0)
#   MASTER_ADDR  rendezvous host when NNODES > 1                 (default 127.0.0.1)
#   MASTER_PORT  rendezvous port                                 (default 29500)
#   PYTHON       interpreter                                     (default python)
#   EXTRA_FLAGS  appended to the command line, e.g. "--max_steps 100 --batch_size 8"
# The run resumes automatically from the newest complete checkpoint in LOG_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_DIR="${DATA_DIR:-./data/preprocessed_data}"
LOG_DIR="${LOG_DIR:-./logs/clf_free_guided}"
NPROC="${NPROC:-1}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
PYTHON="${PYTHON:-python}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"

if [ ! -d "$DATA_DIR" ]; then
  echo "error: data directory '$DATA_DIR' does not exist." >&2
  echo "Preprocess BraTS21 with scripts/preprocess.py, or build a small synthetic dataset:" >&2
  echo "  $PYTHON scripts/make_synthetic_brats.py --out $DATA_DIR" >&2
  echo "then rerun with DATA_DIR=$DATA_DIR." >&2
  exit 2
fi

export OPENAI_LOGDIR="$LOG_DIR"
mkdir -p "$OPENAI_LOGDIR"

FLAGS=(
  --data_dir "$DATA_DIR" --image_dir "$OPENAI_LOGDIR/images" --name brats
  --w 1 1.8 2 3 --threshold 0.1
  --image_size 128 --num_classes 2 --class_cond True --ret_lab True --mixed True
  --unet_ver v2 --clf_free True
  --in_channels 4 --num_channels 128 --attention_resolutions 32,16,8
  --learn_sigma False --dropout 0.1 --weight_decay 0
  --diffusion_steps 1000 --noise_schedule linear
  --rescale_learned_sigmas False --rescale_timesteps False --noise_type gaussian
  --batch_size 64 --ddpm_sampling False --total_epochs 200
  --save_interval 5000 --sample_shape 12 4 128 128
)
# shellcheck disable=SC2206  # EXTRA_FLAGS is meant to be word-split
EXTRA=($EXTRA_FLAGS)

if [ "$NPROC" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
  exec "$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" --nnodes "$NNODES" \
    --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    scripts/train.py "${FLAGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
else
  exec "$PYTHON" scripts/train.py "${FLAGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
fi
