#!/usr/bin/env bash
# Defaults; sbatch's own options override them: `sbatch --nodes=4 --gpus-per-node=4 ...`.
#SBATCH --job-name=trace_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#
# Trains on a multi-node GPU cluster under SLURM: one process per node, each driving all of its
# node's GPUs, joined through `jax.distributed` with the first node of the allocation as
# coordinator (--num_processes=SLURM_NNODES, --process_id=SLURM_NODEID). It does not install
# anything: the environment (a CUDA build of jax 0.10.2 and `pip install -r requirements.txt -e .`)
# must be on every node, e.g. a venv on the shared filesystem.
set -euo pipefail

usage() {
  cat <<EOF
Usage: sbatch [sbatch options] launch/slurm_gpu.sh [options] [-- main flags...]

Runs \`python -m trace_jax.main\` once per node with srun. Defaults in the #SBATCH header:
2 nodes, 1 task per node, 8 GPUs per node, exclusive, 24 h; override them on the sbatch line.

Options (each also read from the environment variable in brackets; sbatch passes the
environment on by default):
  --config=FILE[:ARGS]  experiment config (required) [CONFIG]
  --workdir=DIR         output directory on the shared filesystem (required) [WORKDIR]
  --code_dir=DIR        the repository [CODE_DIR, default: the folder sbatch ran in]
  --venv=DIR            virtualenv to activate, or 'none' [VENV, default CODE_DIR/.venv if present]
  --python=BIN          interpreter when there is no venv [PYTHON, default python3]
  --port=P              coordinator port on the first node [PORT, default 12355]
  --config.a.b=v        passed to main as is (ml-collections overrides)
  -h, --help            this text
Anything after \`--\` is passed to main as well.

Example (from the repository root, 4 nodes of 8 GPUs):
  CONFIG=configs/qwen2_5_vl_7b.py:lora_rank=16 WORKDIR=/shared/runs/lora16 \\
    sbatch --nodes=4 --gpus-per-node=8 --partition=gpu launch/slurm_gpu.sh \\
    -- --config.optim.lr=1e-4
EOF
}

die() {
  echo "slurm_gpu.sh: $*" >&2
  echo "Try 'bash launch/slurm_gpu.sh --help'." >&2
  exit 2
}

CONFIG="${CONFIG:-}"
WORKDIR="${WORKDIR:-}"
CODE_DIR="${CODE_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}"
VENV="${VENV:-}"
PYTHON="${PYTHON:-python3}"
PORT="${PORT:-12355}"
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
    --code_dir) CODE_DIR="$val" ;;
    --venv) VENV="$val" ;;
    --python) PYTHON="$val" ;;
    --port) PORT="$val" ;;
    *) die "unknown option '$key'" ;;
  esac
done

[[ -n "${SLURM_JOB_ID:-}" ]] || die "not inside a SLURM job: submit it with sbatch"
[[ -n "$CONFIG" ]] || die "--config (or CONFIG) is required"
[[ -n "$WORKDIR" ]] || die "--workdir (or WORKDIR) is required"

cd "$CODE_DIR"
if [[ -z "$VENV" && -d .venv ]]; then
  VENV="$PWD/.venv"
fi
if [[ -n "$VENV" && "$VENV" != none ]]; then
  # shellcheck disable=SC1091  # The venv exists only on the cluster.
  source "$VENV/bin/activate"  # srun passes the activated environment to every task.
  PYTHON=python
fi
# `configs` is imported by the config files.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# The whole list, then its first line: `| head -n 1` could kill scontrol with SIGPIPE (pipefail).
nodes="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"
coordinator="${nodes%%$'\n'*}"
[[ -n "$coordinator" ]] || die "scontrol listed no hosts for '$SLURM_JOB_NODELIST'"
mkdir -p "$WORKDIR"
echo "job $SLURM_JOB_ID: $SLURM_NNODES nodes, coordinator $coordinator:$PORT, workdir $WORKDIR"

# SLURM_NODEID differs per task, so it is expanded by each task's shell, not here.
# shellcheck disable=SC2016
srun --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  --label bash -c 'py="$1"; shift; exec "$py" -m trace_jax.main --process_id="$SLURM_NODEID" "$@"' \
  _ "$PYTHON" --config="$CONFIG" --workdir="$WORKDIR" \
  --coordinator_address="$coordinator:$PORT" --num_processes="$SLURM_NNODES" \
  ${EXTRA[@]+"${EXTRA[@]}"}
