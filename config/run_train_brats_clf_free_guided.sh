#!/usr/bin/env bash
# Train the classifier-free guided FPDM UNet (unet_ver v2) on preprocessed BraTS slices with the paper's
# flags (docs/method.md, 'Paper configuration'). Runs on a laptop (one process, CPU or one GPU) and on a cluster (torchrun).
#
# Environment overrides:
#   DATA_DIR     preprocessed data root                          (default ./data/preprocessed_data)
#   LOG_DIR      log/checkpoint dir, exported as OPENAI_LOGDIR   (default ./logs/clf_free_guided)
#   BATCH_SIZE   global batch size                               (default 64, the paper's 2 GPUs x 32)
#   NPROC        processes (GPUs) per node                       (default 1)
#   NNODES       number of nodes                                 (default 1)
#   NODE_RANK    this node's rank when NNODES > 1                (default 0)
#   MASTER_ADDR  rendezvous host when NNODES > 1                 (default 127.0.0.1)
#   MASTER_PORT  rendezvous port                                 (default 29500)
#   PYTHON       interpreter                                     (default python)
#   EXTRA_FLAGS  appended to the command line, e.g. "--max_steps 100 --batch_size 8"
# The run resumes automatically from the newest complete checkpoint in LOG_DIR. Exit code 2 with a message
# when DATA_DIR is not a preprocessed data root (checks and the torchrun switch: config/_launch_common.sh).
# Variant launchers (config/run_train_brats_clf_free_guided_hae_v2.sh) set LAUNCH_VARIANT,
# LAUNCH_VARIANT_FLAGS and TRAIN_SCRIPT and exec this file.
set -euo pipefail
cd "$(dirname "$0")/.."

LAUNCH_VARIANT="${LAUNCH_VARIANT:-}"  # log-dir suffix of a variant, e.g. _hae_v2
LAUNCH_VARIANT_FLAGS="${LAUNCH_VARIANT_FLAGS:---unet_ver v2}"
TRAIN_SCRIPT="${TRAIN_SCRIPT:-scripts/train.py}"
DATA_DIR="${DATA_DIR:-./data/preprocessed_data}"
LOG_DIR="${LOG_DIR:-./logs/clf_free_guided${LAUNCH_VARIANT}}"
BATCH_SIZE="${BATCH_SIZE:-64}"
NPROC="${NPROC:-1}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
PYTHON="${PYTHON:-python}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"

# shellcheck source=config/_launch_common.sh
. config/_launch_common.sh
launch_check_data "$DATA_DIR" train

export OPENAI_LOGDIR="$LOG_DIR"
mkdir -p "$OPENAI_LOGDIR"

# shellcheck disable=SC2206  # LAUNCH_VARIANT_FLAGS is a flag list
LAUNCH_VARIANT_LIST=($LAUNCH_VARIANT_FLAGS)
FLAGS=(
  --data_dir "$DATA_DIR" --image_dir "$OPENAI_LOGDIR/images" --name brats
  --w 1 1.8 2 3 --threshold 0.1
  --image_size 128 --num_classes 2 --class_cond True --ret_lab True --mixed True
  "${LAUNCH_VARIANT_LIST[@]}" --clf_free True
  --in_channels 4 --num_channels 128 --attention_resolutions 32,16,8
  --learn_sigma False --dropout 0.1 --weight_decay 0
  --diffusion_steps 1000 --noise_schedule linear
  --rescale_learned_sigmas False --rescale_timesteps False --noise_type gaussian
  --batch_size "$BATCH_SIZE" --ddpm_sampling False --total_epochs 200
  --save_interval 5000 --sample_shape 12 4 128 128
)
# shellcheck disable=SC2206  # EXTRA_FLAGS is meant to be word-split
EXTRA=($EXTRA_FLAGS)

launch_python "$TRAIN_SCRIPT" "${FLAGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
