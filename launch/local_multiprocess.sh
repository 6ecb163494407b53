#!/usr/bin/env bash
# Runs one training job as N processes on this machine (CPU), each with its own fake XLA devices,
# joined through `jax.distributed` at 127.0.0.1:PORT. It rehearses a multi-host run (process ids,
# the coordinator, global arrays built from process-local data) without a cluster; it is not a way
# to train faster. Each process logs to WORKDIR/logs/process_<i>.log; the script waits for all of
# them and exits non-zero (stopping the others) as soon as one fails.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<EOF
Usage: launch/local_multiprocess.sh [options] [-- main flags...]

Runs \`python -m trace_jax.main\` as N local processes x D fake CPU devices each.

Options (each also read from the environment variable in brackets):
  --num_processes=N        processes to start [NUM_PROCESSES, default 2]
  --devices_per_process=D  fake CPU devices per process [DEVICES_PER_PROCESS, default 4]
  --port=P                 coordinator port on 127.0.0.1 [PORT, default 12355]
  --config=FILE[:ARGS]     experiment config [CONFIG, default $REPO/configs/demo.py]
  --workdir=DIR            output directory (required) [WORKDIR]
  --python=BIN             Python interpreter [PYTHON, default python3]
  --config.a.b=v           passed to main as is (ml-collections overrides)
  -h, --help               this text
Anything after \`--\` is passed to main as well.

Example (the demo config as 2 processes x 4 devices, the same 8-device mesh as one process):
  launch/local_multiprocess.sh --num_processes=2 --devices_per_process=4 \\
    --config=configs/demo.py:steps=20 --workdir=runs/demo_2proc
EOF
}

die() {
  echo "local_multiprocess.sh: $*" >&2
  echo "Try 'launch/local_multiprocess.sh --help'." >&2
  exit 2
}

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"
PORT="${PORT:-12355}"
CONFIG="${CONFIG:-$REPO/configs/demo.py}"
WORKDIR="${WORKDIR:-}"
PYTHON="${PYTHON:-python3}"
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
    --num_processes) NUM_PROCESSES="$val" ;;
    --devices_per_process) DEVICES_PER_PROCESS="$val" ;;
    --port) PORT="$val" ;;
    --config) CONFIG="$val" ;;
    --workdir) WORKDIR="$val" ;;
    --python) PYTHON="$val" ;;
    *) die "unknown option '$key'" ;;
  esac
done

[[ -n "$WORKDIR" ]] || die "--workdir (or WORKDIR) is required"
[[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ ]] || die "--num_processes must be a positive integer"
[[ "$DEVICES_PER_PROCESS" =~ ^[1-9][0-9]*$ ]] || die "--devices_per_process must be positive"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number"

LOG_DIR="$WORKDIR/logs"
mkdir -p "$LOG_DIR"
# `configs` is imported by the config files: put the repository on the path wherever we run from.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap stop_all EXIT
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  log="$LOG_DIR/process_$i.log"
  echo "process $i/$NUM_PROCESSES: $DEVICES_PER_PROCESS devices, log $log"
  XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" \
    JAX_PLATFORMS=cpu \
    "$PYTHON" -m trace_jax.main \
    --config="$CONFIG" --workdir="$WORKDIR" \
    --coordinator_address="127.0.0.1:$PORT" \
    --num_processes="$NUM_PROCESSES" --process_id="$i" \
    ${EXTRA[@]+"${EXTRA[@]}"} >"$log" 2>&1 &
  pids+=("$!")
done

# Stop everyone at the first failure: the survivors would otherwise wait on a dead peer.
failed=0
for ((n = 0; n < NUM_PROCESSES; n++)); do
  if ! wait -n; then
    failed=1
    stop_all
    break
  fi
done

status=0
for i in "${!pids[@]}"; do
  rc=0
  wait "${pids[$i]}" || rc=$?
  if ((rc == 143 && failed)); then
    echo "process $i: stopped after another process failed" >&2
  elif ((rc != 0)); then
    status=1
    echo "process $i exited with status $rc; last lines of $LOG_DIR/process_$i.log:" >&2
    tail -n 30 "$LOG_DIR/process_$i.log" >&2 || true
  fi
done
pids=()

if ((failed || status)); then
  echo "local_multiprocess.sh: FAILED" >&2
  exit 1
fi
echo "all $NUM_PROCESSES processes finished; outputs in $WORKDIR"
