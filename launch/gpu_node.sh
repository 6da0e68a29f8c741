#!/usr/bin/env bash
# EMO-RL on one GPU node (one process drives all its GPUs; the configs' FSDP mesh spans them).
#
#   launch/gpu_node.sh setup | convert | train [--config.key=value ...] | eval [--flag ...]
#
# Run it on the node, from anywhere in the checkout. Every value below can be overridden from the
# environment, e.g. DATA_DIR=/data/MELD.Raw CONFIG=configs/qwen2_audio_7b_meld.py launch/gpu_node.sh train
# DRY_RUN=1 prints the commands instead of running them. See launch/README.md.
set -euo pipefail

# --- Python and JAX ------------------------------------------------------------------------------------
PYTHON="${PYTHON:-python3}"                       # >= 3.11, used to create the venv
VENV_DIR="${VENV_DIR:-$HOME/emorl_venv}"
JAX_PACKAGE="${JAX_PACKAGE:-jax[cuda12]}"         # CUDA 12 wheels (driver >= 525); jax[cuda13] for CUDA 13
PIP_EXTRAS="${PIP_EXTRAS-gcs}"                    # emorl_jax extras; gcs (gcsfs) serves gs:// paths; "" = none
# --- GPU memory and XLA ----------------------------------------------------------------------------------
# JAX preallocates 75% of each GPU by default; a 7B GRPO step needs nearly all of it. 0.92 leaves room for
# cuDNN/cuBLAS workspaces outside XLA's pool.
MEM_FRACTION="${MEM_FRACTION:-0.92}"
# Overlap FSDP all-gathers / reduce-scatters with compute (JAX's GPU performance tips).
GPU_XLA_FLAGS="${GPU_XLA_FLAGS:---xla_gpu_enable_latency_hiding_scheduler=true}"
# --- model and data (local paths; nothing is downloaded) -----------------------------------------------
HF_DIR="${HF_DIR:-$HOME/models/Qwen2-Audio-7B-Instruct}"  # a local snapshot or the Hub id
CKPT_DIR="${CKPT_DIR:-$HOME/ckpt/qwen2_audio_7b}"          # `convert` writes the orbax params here (or gs://...)
CONVERT_PARAM_DTYPE="${CONVERT_PARAM_DTYPE:-float32}"      # matches the 7B configs' param_dtype
# --- the run ----------------------------------------------------------------------------------------
CONFIG="${CONFIG:-configs/qwen2_audio_7b_iemocap.py}"
DATA_DIR="${DATA_DIR:-}"                          # corpus root (train, eval)
FOLD="${FOLD:-}"                                  # IEMOCAP fold 1-5; "" keeps the config's
INIT_FROM="${INIT_FROM:-checkpoint}"              # checkpoint (CKPT_DIR, after `convert`) | hf (read HF_DIR)
RUN_NAME="${RUN_NAME:-$(basename "$CONFIG" .py)${FOLD:+_fold$FOLD}}"
WORKDIR="${WORKDIR:-runs/$RUN_NAME}"              # or gs://bucket/runs/NAME
EVAL_DATASET="${EVAL_DATASET:-}"                  # "" = the config's corpus (iemocap or meld)
EVAL_DATA_DIR="${EVAL_DATA_DIR:-$DATA_DIR}"
EVAL_SPLIT="${EVAL_SPLIT:-test}"                  # for corpora other than IEMOCAP
# "" = the run's final model, $WORKDIR/final; IEMOCAP without FOLD: every fold's run (..._fold{fold}/final)
EVAL_CHECKPOINT="${EVAL_CHECKPOINT:-}"
DRY_RUN="${DRY_RUN:-0}"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<EOF
usage: launch/gpu_node.sh COMMAND [ARGS...]

commands:
  setup     create \$VENV_DIR with \$PYTHON, pip install -e ".[\$PIP_EXTRAS]" "\$JAX_PACKAGE"
  convert   python -m emorl_jax.convert --hf_dir=\$HF_DIR --out=\$CKPT_DIR (on CPU)
  train     python -m emorl_jax.train --config=\$CONFIG --workdir=\$WORKDIR ... (extra ARGS appended)
  eval      python -m emorl_jax.eval --config=\$CONFIG --checkpoint=\$WORKDIR/final ... (extra ARGS appended)

train and eval run with XLA_PYTHON_CLIENT_MEM_FRACTION=\$MEM_FRACTION and XLA_FLAGS=\$GPU_XLA_FLAGS.
Every setting is a variable at the top of this script, overridable from the environment.
DRY_RUN=1 prints the commands instead of running them.
EOF
}

die() { echo "gpu_node.sh: $*" >&2; exit 1; }

# Runs a command, or prints it on one line, each word shell-quoted where it needs it, when DRY_RUN=1.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    local word line=()
    for word in "$@"; do
      if [[ "$word" =~ ^[A-Za-z0-9_./=:,+@%-]+$ ]]; then line+=("$word"); else line+=("${word@Q}"); fi
    done
    echo "${line[*]}"
  else
    "$@"
  fi
}

need() {  # need VAR...: each must be non-empty
  local var
  for var in "$@"; do [[ -n "${!var}" ]] || die "set $var (see the variables at the top of $0)"; done
}

cmd_setup() {
  if [[ "$DRY_RUN" != 1 ]]; then
    local version
    version="$("$PYTHON" -c 'import platform; print(platform.python_version())')"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
      || die "$PYTHON is Python $version; emorl_jax needs >= 3.11: set PYTHON"
  fi
  [[ -x "$VENV_DIR/bin/python" ]] || run "$PYTHON" -m venv "$VENV_DIR"
  run "$VENV_DIR/bin/python" -m pip install -e "$REPO_ROOT${PIP_EXTRAS:+[$PIP_EXTRAS]}" "$JAX_PACKAGE"
  run "$VENV_DIR/bin/python" -c 'import jax; print(jax.devices())'
}

# The venv's python with the GPU memory settings; the XLA flags are added to any the caller set.
gpu_python() {
  run env XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION" XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$GPU_XLA_FLAGS" \
    "$VENV_DIR/bin/python" "$@"
}

cmd_convert() {
  need HF_DIR CKPT_DIR
  # Conversion moves bytes: CPU is enough and leaves the GPUs free.
  run env JAX_PLATFORMS=cpu "$VENV_DIR/bin/python" -m emorl_jax.convert --hf_dir="$HF_DIR" --out="$CKPT_DIR" \
    --param_dtype="$CONVERT_PARAM_DTYPE"
}

cmd_train() {
  need DATA_DIR
  local args=(-m emorl_jax.train --config="$CONFIG" --workdir="$WORKDIR" --config.tokenizer.path="$HF_DIR")
  case "$INIT_FROM" in
    checkpoint) args+=(--config.init.checkpoint="$CKPT_DIR") ;;
    hf) args+=(--config.init.hf_dir="$HF_DIR") ;;
  esac
  args+=(--config.data.data_dir="$DATA_DIR")
  [[ -n "$FOLD" ]] && args+=(--config.data.fold="$FOLD")
  gpu_python "${args[@]}" "$@"
}

cmd_eval() {
  need EVAL_DATA_DIR
  local dataset="$EVAL_DATASET"
  if [[ -z "$dataset" ]]; then
    case "$CONFIG" in
      *iemocap*) dataset=iemocap ;;
      *meld*) dataset=meld ;;
      *) die "set EVAL_DATASET (cannot tell the corpus from CONFIG=$CONFIG)" ;;
    esac
  fi
  local ckpt="$EVAL_CHECKPOINT"
  if [[ -z "$ckpt" ]]; then
    # emorl_jax.eval evaluates IEMOCAP's five folds when --fold is absent, replacing {fold} in --checkpoint.
    if [[ -z "$FOLD" && "$dataset" == iemocap && "$CONFIG" == *iemocap* ]]; then
      ckpt="${WORKDIR}_fold{fold}/final"
    else
      ckpt="$WORKDIR/final"
    fi
  fi
  local args=(-m emorl_jax.eval --config="$CONFIG" --checkpoint="$ckpt" --dataset="$dataset"
              --data_dir="$EVAL_DATA_DIR" --tokenizer="$HF_DIR")
  # FOLD picks the run; it is a test session only on IEMOCAP (other corpora use EVAL_SPLIT).
  if [[ -n "$FOLD" && "$dataset" == iemocap ]]; then args+=(--fold="$FOLD"); else args+=(--split="$EVAL_SPLIT"); fi
  gpu_python "${args[@]}" "$@"
}

main() {
  [[ $# -ge 1 ]] || { usage >&2; exit 2; }
  local command="$1"
  shift
  case "$command" in
    -h|--help|help) usage; return ;;
    setup|convert|train|eval) ;;
    *) usage >&2; die "unknown command '$command'" ;;
  esac
  [[ "$INIT_FROM" == checkpoint || "$INIT_FROM" == hf ]] || die "INIT_FROM must be checkpoint or hf, got '$INIT_FROM'"
  case "$command" in
    setup|convert) [[ $# -eq 0 ]] || die "$command takes no arguments, got: $*" ;;
  esac
  cd "$REPO_ROOT"  # CONFIG and WORKDIR are relative to the checkout
  "cmd_$command" "$@"
}

main "$@"
