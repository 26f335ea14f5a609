#!/usr/bin/env bash
# Train the classifier-free guided HAE UNet V2 (unet_ver hae_v2) on preprocessed BraTS slices: the FPDM
# launcher's flags (config/run_train_brats_clf_free_guided.sh, anofpdm_spec.md 6.1/6.3) with
# --unet_ver hae_v2 --use_hae True --bottleneck_ratio, batch 14, its own log dir and port, run through
# scripts/train_hae_v2.py. Runs on a laptop (one process, CPU or one GPU) and on a cluster (torchrun).
#
# Environment overrides:
#   DATA_DIR          preprocessed data root                          (default ./data/preprocessed_data)
#   LOG_DIR           log/checkpoint dir, exported as OPENAI_LOGDIR   (default ./logs/clf_free_guided_hae_v2)
#   BOTTLENECK_RATIO  HAE V2 bottleneck MLP ratio, in (0, 1]          (default 0.25)
#   BATCH_SIZE        global batch size                               (default 14)
#   NPROC             processes (GPUs) per node                       (default 1)
#   NNODES            number of nodes                                 (default 1)
#   NODE_RANK         this node's rank when NNODES > 1                (default 0)
#   MASTER_ADDR       rendezvous host when NNODES > 1                 (default 127.0.0.1)
#   MASTER_PORT       rendezvous port                                 (default 12361)
#   PYTHON            interpreter                                     (default python)
#   EXTRA_FLAGS       appended to the command line, e.g. "--max_steps 100 --batch_size 8"
# The run resumes automatically from the newest complete checkpoint in LOG_DIR. Exit code 2 with a message
# when DATA_DIR is not a preprocessed data root (checks and the torchrun switch: config/_launch_common.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_DIR="${DATA_DIR:-./data/preprocessed_data}"
LOG_DIR="${LOG_DIR:-./logs/clf_free_guided_hae_v2}"
BOTTLENECK_RATIO="${BOTTLENECK_RATIO:-0.25}"
BATCH_SIZE="${BATCH_SIZE:-14}"
NPROC="${NPROC:-1}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-12361}"
PYTHON="${PYTHON:-python}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"

# shellcheck source=config/_launch_common.sh
. config/_launch_common.sh
launch_check_data "$DATA_DIR" train

export OPENAI_LOGDIR="$LOG_DIR"
mkdir -p "$OPENAI_LOGDIR"

FLAGS=(
  --data_dir "$DATA_DIR" --image_dir "$OPENAI_LOGDIR/images" --name brats
  --w 1 1.8 2 3 --threshold 0.1
  --image_size 128 --num_classes 2 --class_cond True --ret_lab True --mixed True
  --unet_ver hae_v2 --use_hae True --bottleneck_ratio "$BOTTLENECK_RATIO" --clf_free True
  --in_channels 4 --num_channels 128 --attention_resolutions 32,16,8
  --learn_sigma False --dropout 0.1 --weight_decay 0
  --diffusion_steps 1000 --noise_schedule linear
  --rescale_learned_sigmas False --rescale_timesteps False --noise_type gaussian
  --batch_size "$BATCH_SIZE" --ddpm_sampling False --total_epochs 200
  --save_interval 5000 --sample_shape 12 4 128 128
)
# shellcheck disable=SC2206  # EXTRA_FLAGS is meant to be word-split
EXTRA=($EXTRA_FLAGS)

launch_python scripts/train_hae_v2.py "${FLAGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
