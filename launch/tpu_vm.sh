#!/usr/bin/env bash
# EMO-RL on a Cloud TPU VM slice (single host such as v5p-8, or a multi-host pod slice).
#
#   launch/tpu_vm.sh create | setup | convert | train [--config.key=value ...] | eval [--flag ...] | logs | delete
#
# Every value below can be overridden from the environment, e.g.
#   ZONE=us-east5-a TPU_NAME=emorl ACCELERATOR_TYPE=v5p-8 launch/tpu_vm.sh create
#   DATA_DIR=/mnt/shared/data/IEMOCAP_full_release FOLD=2 launch/tpu_vm.sh train --config.rl.steps=100
# DRY_RUN=1 prints the commands instead of running them. See launch/README.md.
set -euo pipefail

# --- cloud -------------------------------------------------------------------------------------------
PROJECT="${PROJECT:-}"                            # "" = gcloud's configured project
ZONE="${ZONE:-us-east5-a}"                        # a zone that offers ACCELERATOR_TYPE
TPU_NAME="${TPU_NAME:-emorl-tpu}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5p-8}"     # v5p-8 = 4 chips, one host; v4-8 is too small (launch/README.md)
# TPU software version: v5p v2-alpha-tpuv5; v4 tpu-ubuntu2204-base; v5e v2-alpha-tpuv5-lite; v6e v2-alpha-tpuv6e
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5}"
SPOT="${SPOT:-0}"                                 # 1 = create a spot (preemptible) slice
# --- code and Python on every worker (paths relative to the worker's home) ---------------------------
REPO_URL="${REPO_URL:-}"                          # git URL to clone; "" = copy this checkout (git ls-files)
REPO_REF="${REPO_REF:-main}"                      # branch, tag or commit when cloning
REMOTE_DIR="${REMOTE_DIR:-emorl_jax}"
VENV_DIR="${VENV_DIR:-emorl_venv}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"          # TPU VM images ship Python 3.10; we need >= 3.11 (installed by uv)
JAX_PACKAGE="${JAX_PACKAGE:-jax[tpu]}"
PIP_EXTRAS="${PIP_EXTRAS-gcs}"                    # emorl_jax extras; gcs (gcsfs) serves gs:// paths; "" = none
# --- storage every worker sees at the same path (checkpoints, data, the HF snapshot) --------------------
# Runs and orbax checkpoints may be gs:// URLs instead (RUNS_DIR, CKPT_DIR): no shared file system needed for them.
SHARED_DIR="${SHARED_DIR:-/mnt/shared}"
NFS_SHARE="${NFS_SHARE:-}"                        # e.g. 10.0.0.2:/vol1 (Filestore): setup mounts it at SHARED_DIR
GCS_BUCKET="${GCS_BUCKET:-}"                      # or a bucket name: setup mounts it with gcsfuse
HF_DIR="${HF_DIR:-$SHARED_DIR/models/Qwen2-Audio-7B-Instruct}"  # a local snapshot, or the Hub id
CKPT_DIR="${CKPT_DIR:-$SHARED_DIR/ckpt/qwen2_audio_7b}"         # `convert` writes the orbax params here (or gs://...)
RUNS_DIR="${RUNS_DIR:-$SHARED_DIR/runs}"                         # run directories (or gs://bucket/runs)
CONVERT_PARAM_DTYPE="${CONVERT_PARAM_DTYPE:-float32}"           # matches the 7B configs' param_dtype
# --- the run ----------------------------------------------------------------------------------------
CONFIG="${CONFIG:-configs/qwen2_audio_7b_iemocap.py}"
DATA_DIR="${DATA_DIR:-}"                          # corpus root under SHARED_DIR (train, eval)
FOLD="${FOLD:-}"                                  # IEMOCAP fold 1-5; "" keeps the config's
INIT_FROM="${INIT_FROM:-checkpoint}"              # checkpoint (CKPT_DIR, after `convert`) | hf (read HF_DIR)
RUN_NAME="${RUN_NAME:-$(basename "$CONFIG" .py)${FOLD:+_fold$FOLD}}"
WORKDIR="${WORKDIR:-$RUNS_DIR/$RUN_NAME}"
DETACH="${DETACH:-0}"                             # 1 = train/eval keep running after ssh returns (see `logs`)
EVAL_DATASET="${EVAL_DATASET:-}"                  # "" = the config's corpus (iemocap or meld)
EVAL_DATA_DIR="${EVAL_DATA_DIR:-$DATA_DIR}"
EVAL_SPLIT="${EVAL_SPLIT:-test}"                  # for corpora other than IEMOCAP
# "" = the run's final model, $WORKDIR/final; IEMOCAP without FOLD: every fold's run (..._fold{fold}/final)
EVAL_CHECKPOINT="${EVAL_CHECKPOINT:-}"
DRY_RUN="${DRY_RUN:-0}"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<EOF
usage: launch/tpu_vm.sh COMMAND [ARGS...]

commands:
  create    gcloud compute tpus tpu-vm create \$TPU_NAME (\$ACCELERATOR_TYPE, \$RUNTIME_VERSION, \$ZONE)
  setup     on every worker: mount \$SHARED_DIR (NFS_SHARE or GCS_BUCKET), copy or clone the repo,
            create a Python \$PYTHON_VERSION venv, pip install -e ".[\$PIP_EXTRAS]" "\$JAX_PACKAGE"
  convert   on worker 0 (CPU): python -m emorl_jax.convert --hf_dir=\$HF_DIR --out=\$CKPT_DIR
  train     on every worker: python -m emorl_jax.train --multihost --config=\$CONFIG --workdir=\$WORKDIR ...
            extra ARGS are appended (e.g. --config.rl.steps=100)
  eval      on every worker: python -m emorl_jax.eval --config=\$CONFIG --checkpoint=\$WORKDIR/final ...
  logs      tail worker 0's log of \$RUN_NAME
  delete    gcloud compute tpus tpu-vm delete \$TPU_NAME

Every setting is a variable at the top of this script, overridable from the environment.
DRY_RUN=1 prints the commands instead of running them.
EOF
}

die() { echo "tpu_vm.sh: $*" >&2; exit 1; }

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

quote() {  # words -> one shell-quoted string for a remote command line
  local quoted
  quoted="$(printf '%q ' "$@")"
  printf '%s' "${quoted% }"
}

gcloud_flags() {
  local flags=(--zone="$ZONE")
  [[ -n "$PROJECT" ]] && flags+=(--project="$PROJECT")
  printf '%s\n' "${flags[@]}"
}

# Runs a shell command line on the workers given ("all" or an index).
remote() {
  local workers="$1" command="$2" flags
  mapfile -t flags < <(gcloud_flags)
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${flags[@]}" --worker="$workers" --command="$command"
}

# `cd` into the repo with the venv active, then run the given words (already quoted) on the workers, logging
# to ~/logs/$RUN_NAME.<what>.log; with DETACH=1 in the background (nohup), so ssh returns at once.
remote_python() {
  local workers="$1" what="$2" words="$3"
  # shellcheck disable=SC2088  # the tilde is for the worker's shell
  local log="~/logs/$RUN_NAME.$what.log"
  local inner="source ~/$VENV_DIR/bin/activate && cd ~/$REMOTE_DIR && $words"
  if [[ "$DETACH" == 1 ]]; then
    remote "$workers" "mkdir -p ~/logs && nohup bash -c $(printf '%q' "$inner") > $log 2>&1 < /dev/null &"
  else
    remote "$workers" "set -o pipefail; mkdir -p ~/logs && $inner 2>&1 | tee -a $log"
  fi
}

check_names() {
  [[ -n "$TPU_NAME" && -n "$ZONE" ]] || die "TPU_NAME and ZONE must be set"
  local name
  for name in "$REMOTE_DIR" "$VENV_DIR" "$RUN_NAME"; do
    [[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || die "'$name' (REMOTE_DIR, VENV_DIR or RUN_NAME) must be a plain name"
  done
}

need() {  # need VAR...: each must be non-empty
  local var
  for var in "$@"; do [[ -n "${!var}" ]] || die "set $var (see the variables at the top of $0)"; done
}

cmd_create() {
  local flags
  mapfile -t flags < <(gcloud_flags)
  local extra=()
  [[ "$SPOT" == 1 ]] && extra+=(--spot)
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${flags[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" "${extra[@]}"
}

cmd_setup() {
  local flags
  mapfile -t flags < <(gcloud_flags)
  local shared_q
  shared_q="$(quote "$SHARED_DIR")"
  if [[ -n "$NFS_SHARE" ]]; then
    remote all "sudo apt-get update -q && sudo apt-get install -y -q nfs-common && sudo mkdir -p $shared_q && \
(mountpoint -q $shared_q || sudo mount -t nfs -o rw,hard $(quote "$NFS_SHARE") $shared_q)"
  elif [[ -n "$GCS_BUCKET" ]]; then
    # Cloud Storage FUSE from Google's apt repository; --rename-dir-limit lets orbax commit checkpoint dirs.
    remote all "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | \
sudo gpg --dearmor --yes -o /usr/share/keyrings/cloud.google.gpg && \
echo \"deb [signed-by=/usr/share/keyrings/cloud.google.gpg] https://packages.cloud.google.com/apt \
gcsfuse-\$(lsb_release -c -s) main\" | \
sudo tee /etc/apt/sources.list.d/gcsfuse.list && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse && \
sudo mkdir -p $shared_q && sudo chown \$(id -u):\$(id -g) $shared_q && \
(mountpoint -q $shared_q || gcsfuse --implicit-dirs --rename-dir-limit=200000 $(quote "$GCS_BUCKET") $shared_q)"
  fi
  if [[ -n "$REPO_URL" ]]; then
    remote all "([ -d ~/$REMOTE_DIR/.git ] || git clone $(quote "$REPO_URL") ~/$REMOTE_DIR) && \
git -C ~/$REMOTE_DIR fetch origin $(quote "$REPO_REF") && git -C ~/$REMOTE_DIR checkout --detach FETCH_HEAD"
  else
    local tarball="${TMPDIR:-/tmp}/emorl_jax_src.tar.gz"
    # Tracked and untracked-but-not-ignored files: the working tree without runs, venvs or caches.
    run bash -c "cd $(quote "$REPO_ROOT") && git ls-files -z --cached --others --exclude-standard | \
tar --null -T - -czf $(quote "$tarball")"
    run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:emorl_jax_src.tar.gz" "${flags[@]}" --worker=all
    remote all "mkdir -p ~/$REMOTE_DIR && tar -xzf ~/emorl_jax_src.tar.gz -C ~/$REMOTE_DIR"
  fi
  local extras="${PIP_EXTRAS:+[$PIP_EXTRAS]}"  # e.g. [gcs]
  remote all "(python3 -m pip install --user -q uv || python3 -m pip install --user -q --break-system-packages uv) && \
([ -x ~/$VENV_DIR/bin/python ] || ~/.local/bin/uv venv --seed --python $(quote "$PYTHON_VERSION") ~/$VENV_DIR) && \
~/$VENV_DIR/bin/python -m pip install -q -e ~/$REMOTE_DIR$(quote "$extras") $(quote "$JAX_PACKAGE") && \
~/$VENV_DIR/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
}

cmd_convert() {
  need HF_DIR CKPT_DIR
  # CPU only: conversion moves bytes and needs no TPU, so one worker can run it without the others.
  remote_python 0 convert "$(quote env JAX_PLATFORMS=cpu python -m emorl_jax.convert --hf_dir="$HF_DIR" \
    --out="$CKPT_DIR" --param_dtype="$CONVERT_PARAM_DTYPE")"
}

init_flags() {
  # The tokenizer always comes from the HF snapshot; the weights from the converted checkpoint or the snapshot.
  printf '%s\n' "--config.tokenizer.path=$HF_DIR"
  case "$INIT_FROM" in
    checkpoint) printf '%s\n' "--config.init.checkpoint=$CKPT_DIR" ;;
    hf) printf '%s\n' "--config.init.hf_dir=$HF_DIR" ;;
  esac
}

cmd_train() {
  need DATA_DIR
  local init
  mapfile -t init < <(init_flags)
  local args=(python -m emorl_jax.train --multihost --config="$CONFIG" --workdir="$WORKDIR" "${init[@]}"
              --config.data.data_dir="$DATA_DIR")
  [[ -n "$FOLD" ]] && args+=(--config.data.fold="$FOLD")
  remote_python all train "$(quote "${args[@]}" "$@")"
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
  local args=(python -m emorl_jax.eval --multihost --config="$CONFIG" --checkpoint="$ckpt" --dataset="$dataset"
              --data_dir="$EVAL_DATA_DIR" --tokenizer="$HF_DIR")
  # FOLD picks the run; it is a test session only on IEMOCAP (other corpora use EVAL_SPLIT).
  if [[ -n "$FOLD" && "$dataset" == iemocap ]]; then args+=(--fold="$FOLD"); else args+=(--split="$EVAL_SPLIT"); fi
  remote_python all "eval_$dataset" "$(quote "${args[@]}" "$@")"
}

cmd_logs() {
  remote 0 "tail -n 100 -f ~/logs/$RUN_NAME.train.log"
}

cmd_delete() {
  local flags
  mapfile -t flags < <(gcloud_flags)
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${flags[@]}" --quiet
}

main() {
  [[ $# -ge 1 ]] || { usage >&2; exit 2; }
  local command="$1"
  shift
  case "$command" in
    -h|--help|help) usage; return ;;
    create|setup|convert|train|eval|logs|delete) ;;
    *) usage >&2; die "unknown command '$command'" ;;
  esac
  check_names
  [[ "$INIT_FROM" == checkpoint || "$INIT_FROM" == hf ]] || die "INIT_FROM must be checkpoint or hf, got '$INIT_FROM'"
  case "$command" in
    create|setup|convert|logs|delete) [[ $# -eq 0 ]] || die "$command takes no arguments, got: $*" ;;
  esac
  "cmd_$command" "$@"
}

main "$@"
