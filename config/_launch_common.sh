# Shared helpers of the config/run_*.sh launchers (sourced, not executed). Bash, `set -euo pipefail` in the
# caller. Every check failure prints what is missing, how to get it, and exits with code 2.

# launch_fail LINE...: print the lines to stderr and exit 2.
launch_fail() {
  local line
  for line in "$@"; do
    echo "$line" >&2
  done
  exit 2
}

# launch_check_procs: NPROC and NNODES (when set) are positive integers, NODE_RANK a non-negative one.
launch_check_procs() {
  local name value
  for name in NPROC NNODES; do
    value="${!name:-1}"
    if ! [[ "$value" =~ ^[0-9]+$ ]] || [ "$((10#$value))" -lt 1 ]; then
      launch_fail "error: $name must be a positive integer (processes per node / nodes), got '$value'."
    fi
  done
  value="${NODE_RANK:-0}"
  if ! [[ "$value" =~ ^[0-9]+$ ]]; then
    launch_fail "error: NODE_RANK must be a non-negative integer, got '$value'."
  fi
}

# launch_check_data DATA_DIR SPLIT...: the preprocessed data root exists and holds data_splits/<SPLIT>.
launch_check_data() {
  local data_dir="$1" split
  shift
  launch_check_procs
  if [ ! -d "$data_dir" ]; then
    launch_fail "error: data directory '$data_dir' (DATA_DIR) does not exist." \
      "Preprocess BraTS21 with config/run_preprocess.sh (scripts/preprocess.py), or build a small" \
      "synthetic dataset: ${PYTHON:-python} scripts/make_synthetic_brats.py --out $data_dir" \
      "then rerun with DATA_DIR=$data_dir."
  fi
  for split in "$@"; do
    if [ ! -d "$data_dir/data_splits/$split" ]; then
      launch_fail "error: '$data_dir/data_splits/$split' does not exist: DATA_DIR=$data_dir is not a" \
        "preprocessed data root (expected data_splits/{train,val,test} and npy_<split>/)." \
        "Run config/run_preprocess.sh or point DATA_DIR at the preprocessed folder."
    fi
  done
}

# launch_check_checkpoint MODEL_DIR MODEL_NUM EMA EMA_RATE TRAIN_LAUNCHER TRAIN_LOG_DIR: the checkpoint
# that the evaluation will load exists (MODEL_NUM empty = newest; EMA True -> ema_<rate>_<step>.pt, else
# model<step>.pt, steps zero-padded to 6 digits as written by the training loop).
launch_check_checkpoint() {
  local model_dir="$1" model_num="$2" ema="$3" ema_rate="$4" train="$5" train_dir="$6" pattern want present
  local how="Train a model with $train (it writes its checkpoints to $train_dir, the default MODEL_DIR),"
  how="$how or set MODEL_DIR to the training log dir and MODEL_NUM to a step that exists there"
  how="$how (MODEL_NUM= for the newest)."
  if [ ! -d "$model_dir" ]; then
    launch_fail "error: model directory '$model_dir' (MODEL_DIR) does not exist." "$how"
  fi
  case "$ema" in
    True | true | 1 | yes) pattern="ema_${ema_rate}_" ;;
    False | false | 0 | no) pattern="model" ;;
    *) launch_fail "error: EMA must be True or False, got '$ema'." ;;
  esac
  if [ -n "$model_num" ]; then
    if ! [[ "$model_num" =~ ^[0-9]+$ ]]; then
      launch_fail "error: MODEL_NUM must be a training step (digits) or empty for the newest," \
        "got '$model_num'."
    fi
    want="$model_dir/${pattern}$(printf '%06d' "$((10#$model_num))").pt"
    if [ -f "$want" ]; then
      return 0
    fi
  else
    want="$model_dir/${pattern}*.pt"
    if compgen -G "$want" > /dev/null; then
      return 0
    fi
  fi
  present="$(cd "$model_dir" && ls -1 -- model*.pt ema_*.pt 2> /dev/null | tr '\n' ' ' || true)"
  present="${present% }"
  launch_fail "error: checkpoint '$want' (MODEL_DIR=$model_dir, MODEL_NUM=${model_num:-newest}, EMA=$ema)" \
    "does not exist; checkpoints present: ${present:-none}." "$how"
}

# launch_python SCRIPT ARG...: run SCRIPT with $PYTHON, through torchrun (torch.distributed.run) when
# NPROC > 1 or NNODES > 1 (NODE_RANK, MASTER_ADDR, MASTER_PORT for the rendezvous). Replaces the shell.
launch_python() {
  local script="$1"
  shift
  launch_check_procs
  if [ "$((10#$NPROC))" -gt 1 ] || [ "$((10#$NNODES))" -gt 1 ]; then
    exec "$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" --nnodes "$NNODES" \
      --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
      "$script" "$@"
  else
    exec "$PYTHON" "$script" "$@"
  fi
}
