#!/usr/bin/env bash
# What runs on every worker of a TPU pod slice (launch/tpu_pod.sh calls it with --worker=all): the
# same command everywhere; `--num_processes=-1` lets `jax.distributed.initialize()` find the pod's
# processes, ids and coordinator itself. Optionally mounts a GCS bucket with gcsfuse so that WORKDIR
# (checkpoints, metrics, the generated demo world) is one folder that every worker sees. It does not
# create machines or install anything: that is launch/tpu_pod.sh.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<EOF
Usage: launch/worker.sh [options] [-- main flags...]

Runs \`python -m trace_jax.main --num_processes=-1\` on this worker, logging to
WORKDIR/logs/<hostname>.log as well as to the terminal.

Options (each also read from the environment variable in brackets):
  --config=FILE[:ARGS]  experiment config, relative to the code folder (required) [CONFIG]
  --workdir=DIR         output directory, shared by all workers [WORKDIR]
                        (default with --bucket: MOUNT_DIR/runs/RUN_NAME; required without)
  --run_name=NAME       run name for the default workdir [RUN_NAME, default: config file name]
  --bucket=NAME         GCS bucket to mount with gcsfuse (no gs:// prefix) [BUCKET]
  --mount_dir=DIR       where to mount it [MOUNT_DIR, default \$HOME/gcs/BUCKET]
  --venv=DIR            virtualenv to activate, or 'none' [VENV, default $REPO/.venv if present]
  --python=BIN          interpreter when there is no venv [PYTHON, default python3]
  --sweep=FILE          run every variant of a sweep file (trace_jax.tools.sweep) instead of
                        one training run; WORKDIR holds one folder per variant [SWEEP]
  --config.a.b=v        passed to main as is (ml-collections overrides)
  -h, --help            this text
Anything after \`--\` is passed to main as well.

Example (on every worker at once, normally through launch/tpu_pod.sh):
  bash launch/worker.sh --config=configs/qwen2_5_vl_7b.py:lora_rank=16 --bucket=my-bucket \\
    --run_name=lora16 -- --config.optim.lr=1e-4
EOF
}

die() {
  echo "worker.sh: $*" >&2
  echo "Try 'launch/worker.sh --help'." >&2
  exit 2
}

CONFIG="${CONFIG:-}"
WORKDIR="${WORKDIR:-}"
RUN_NAME="${RUN_NAME:-}"
BUCKET="${BUCKET:-}"
MOUNT_DIR="${MOUNT_DIR:-}"
VENV="${VENV:-}"
PYTHON="${PYTHON:-python3}"
SWEEP="${SWEEP:-}"
EXTRA=()

while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA+=("$@"); break ;;
    --config.*) EXTRA+=("$1"); shift; continue ;;
    --*=*) key="${1%%=*}"; val="${1#*=}"; shift ;;
    --*) (($# >= 2)) || die "$1 needs a value"; key="$1"; val="$2"; shift 2 ;;
    *) die "unexpected argument '$1'" ;;
  esac
  case "$key" in
    --config) CONFIG="$val" ;;
    --workdir) WORKDIR="$val" ;;
    --run_name) RUN_NAME="$val" ;;
    --bucket) BUCKET="$val" ;;
    --mount_dir) MOUNT_DIR="$val" ;;
    --venv) VENV="$val" ;;
    --python) PYTHON="$val" ;;
    --sweep) SWEEP="$val" ;;
    *) die "unknown option '$key'" ;;
  esac
done

[[ -n "$CONFIG" ]] || die "--config (or CONFIG) is required"
BUCKET="${BUCKET#gs://}"
BUCKET="${BUCKET%/}"

if [[ -n "$BUCKET" ]]; then
  MOUNT_DIR="${MOUNT_DIR:-$HOME/gcs/$BUCKET}"
  mkdir -p "$MOUNT_DIR"
  if ! mountpoint -q "$MOUNT_DIR"; then
    command -v gcsfuse >/dev/null || die "gcsfuse is not installed (launch/tpu_pod.sh installs it)"
    gcsfuse --implicit-dirs "$BUCKET" "$MOUNT_DIR"
  fi
  if [[ -z "$WORKDIR" ]]; then
    config_file="${CONFIG%%:*}"
    config_file="${config_file##*/}"
    WORKDIR="$MOUNT_DIR/runs/${RUN_NAME:-${config_file%.py}}"
  fi
fi
[[ -n "$WORKDIR" ]] || die "--workdir (or WORKDIR) is required when there is no --bucket"

cd "$REPO"
if [[ -z "$VENV" && -d "$REPO/.venv" ]]; then
  VENV="$REPO/.venv"
fi
if [[ -n "$VENV" && "$VENV" != none ]]; then
  # shellcheck disable=SC1091  # The venv exists only on the worker.
  source "$VENV/bin/activate"
  PYTHON=python
fi

mkdir -p "$WORKDIR/logs"
log="$WORKDIR/logs/$(hostname).log"
echo "worker $(hostname): config $CONFIG, workdir $WORKDIR, log $log"
if [[ -n "$SWEEP" ]]; then
  # Every worker runs the same sweep; each variant's main joins the pod's processes.
  extra=(--extra=--num_processes=-1)
  for flag in ${EXTRA[@]+"${EXTRA[@]}"}; do
    extra+=("--extra=$flag")
  done
  "$PYTHON" -m trace_jax.tools.sweep --sweep="$SWEEP" --config="$CONFIG" --workdir="$WORKDIR" \
    "${extra[@]}" 2>&1 | tee -a "$log"
else
  "$PYTHON" -m trace_jax.main --config="$CONFIG" --workdir="$WORKDIR" --num_processes=-1 \
    ${EXTRA[@]+"${EXTRA[@]}"} 2>&1 | tee -a "$log"
fi
