#!/usr/bin/env bash
# AnoFPDM evaluation of a classifier-free guided FPDM UNet (unet_ver v2) on preprocessed BraTS slices with
# the paper's flags (docs/method.md, 'Paper configuration'): calibrate on the validation split, segment the
# test split, write metrics.json / slices.csv / patients.csv / panels to LOG_DIR. One process (CPU or one GPU) or torchrun.
#
# Environment overrides:
#   DATA_DIR        preprocessed data root                        (default ./data/preprocessed_data)
#   MODEL_DIR       training log dir holding the checkpoints      (default ./logs/clf_free_guided, the
#                   output of config/run_train_brats_clf_free_guided.sh)
#   MODEL_NUM       checkpoint step; empty = newest               (default 210000)
#   EMA / EMA_RATE  evaluate the EMA weights ema_<rate>_<step>.pt (default True / 0.9999)
#   W               guidance strength(s); several, e.g. "1 2 3", are served by one forward pass and the
#                   primary result is the w chosen by the paper's rule                 (default 2)
#                   (docs/method.md, 'Choosing the guidance strength')
#   LOG_DIR         output dir, exported as OPENAI_LOGDIR
#                   (default ./logs/translation_fpdm_<W>_<MODEL_NUM>_600)
#   BATCH_SIZE / BATCH_SIZE_VAL   test / validation batch size    (default 50 / 50)
#   NUM_SLICES      first N test slices; empty = the whole test split         (default empty)
#   NUM_SLICES_VAL  first N validation slices for the calibration (default 1000, the paper's 1,000)
#   NPROC           processes (GPUs) per node                     (default 1)
#   NNODES          number of nodes                               (default 1)
#   NODE_RANK       this node's rank when NNODES > 1              (default 0)
#   MASTER_ADDR     rendezvous host when NNODES > 1               (default 127.0.0.1)
#   MASTER_PORT     rendezvous port                               (default 29501)
#   PYTHON          interpreter                                   (default python)
#   EXTRA_FLAGS     appended to the command line, e.g. "--save_nifti True --t_e_ratio 1 2"
# Exit code 2 (with a message naming the path) when the data, the model dir or the checkpoint is missing.
# Variant launchers (config/run_translation_brats_fpdm_hae_v2.sh) set LAUNCH_VARIANT, LAUNCH_VARIANT_FLAGS,
# TRANSLATION_SCRIPT and TRAIN_LAUNCHER and exec this file.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=config/_launch_common.sh
. config/_launch_common.sh

DATA_DIR="${DATA_DIR:-./data/preprocessed_data}"
LAUNCH_VARIANT="${LAUNCH_VARIANT:-}"  # log-dir suffix of a variant, e.g. _hae_v2
LAUNCH_VARIANT_FLAGS="${LAUNCH_VARIANT_FLAGS:---unet_ver v2}"
TRANSLATION_SCRIPT="${TRANSLATION_SCRIPT:-scripts/translation_FPDM.py}"
TRAIN_LAUNCHER="${TRAIN_LAUNCHER:-config/run_train_brats_clf_free_guided.sh}"
MODEL_DIR="${MODEL_DIR:-./logs/clf_free_guided${LAUNCH_VARIANT}}"
MODEL_NUM="${MODEL_NUM-210000}"
EMA="${EMA:-True}"
EMA_RATE="${EMA_RATE:-0.9999}"
W="${W:-2}"
FORWARD_STEPS=600
LOG_DIR="${LOG_DIR:-./logs/translation_fpdm${LAUNCH_VARIANT}_${W// /-}_${MODEL_NUM:-latest}_${FORWARD_STEPS}}"
BATCH_SIZE="${BATCH_SIZE:-50}"
BATCH_SIZE_VAL="${BATCH_SIZE_VAL:-50}"
NUM_SLICES="${NUM_SLICES:-}"
NUM_SLICES_VAL="${NUM_SLICES_VAL:-1000}"
NPROC="${NPROC:-1}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29501}"
PYTHON="${PYTHON:-python}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"

launch_check_data "$DATA_DIR" val test
launch_check_checkpoint "$MODEL_DIR" "$MODEL_NUM" "$EMA" "$EMA_RATE" \
  "$TRAIN_LAUNCHER" "./logs/clf_free_guided${LAUNCH_VARIANT}"

export OPENAI_LOGDIR="$LOG_DIR"
mkdir -p "$OPENAI_LOGDIR"

# shellcheck disable=SC2206  # W is a space-separated list
W_LIST=($W)
# shellcheck disable=SC2206  # LAUNCH_VARIANT_FLAGS is a flag list
LAUNCH_VARIANT_LIST=($LAUNCH_VARIANT_FLAGS)
MODEL_FLAGS=(
  --image_size 128 --num_classes 2 --in_channels 4 --num_channels 128 --attention_resolutions 32,16,8
  "${LAUNCH_VARIANT_LIST[@]}" --w "${W_LIST[@]}" --ema "$EMA" --ema_rate "$EMA_RATE"
  --forward_steps "$FORWARD_STEPS" --d_reverse True
)
if [ -n "$MODEL_NUM" ]; then
  MODEL_FLAGS+=(--model_num "$MODEL_NUM")
fi
DATA_FLAGS=(--batch_size "$BATCH_SIZE" --batch_size_val "$BATCH_SIZE_VAL" --modality 0 3 --seed 0)
if [ -n "$NUM_SLICES" ]; then
  DATA_FLAGS+=(--num_slices "$NUM_SLICES")
fi
if [ -n "$NUM_SLICES_VAL" ]; then
  DATA_FLAGS+=(--num_slices_val "$NUM_SLICES_VAL")
fi
DIFFUSION_FLAGS=(
  --dynamic_clip False --diffusion_steps 1000 --noise_schedule linear
  --rescale_learned_sigmas False --rescale_timesteps False
)
DIR_FLAGS=(
  --name brats --save_data False --data_dir "$DATA_DIR" --model_dir "$MODEL_DIR" --log_dir "$LOG_DIR"
)
ABLATION_FLAGS=(--last_only False --subset_interval -1 --t_e_ratio 1)
# shellcheck disable=SC2206  # EXTRA_FLAGS is meant to be word-split
EXTRA=($EXTRA_FLAGS)

launch_python "$TRANSLATION_SCRIPT" "${MODEL_FLAGS[@]}" "${DATA_FLAGS[@]}" "${DIFFUSION_FLAGS[@]}" \
  "${DIR_FLAGS[@]}" "${ABLATION_FLAGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
