#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice from this machine: creates the slice if it is absent (or reuses
# it), copies the code (the files git tracks, and untracked ones it does not ignore) to every
# worker, installs it, and runs the same command, launch/worker.sh, on every worker at once. It
# does not delete the slice afterwards (`gcloud compute tpus tpu-vm delete NAME --project P
# --zone Z` does). With --dry_run it prints the commands it would run and runs none (not even the
# `describe`).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<EOF
Usage: launch/tpu_pod.sh [options] [-- main flags...]

Create-or-reuse a TPU VM slice, ship and install the code, and run launch/worker.sh on every worker.

Slice (each also read from the environment variable in brackets; all required):
  --project=ID              Google Cloud project [PROJECT]
  --zone=ZONE               zone, e.g. us-east5-a [ZONE]
  --tpu_name=NAME           slice name [TPU_NAME]
  --accelerator_type=TYPE   e.g. v5p-32, v6e-64; used only when creating [ACCELERATOR_TYPE]
  --runtime_version=V       TPU software version, e.g. v2-alpha-tpuv5; used only when creating
                            [RUNTIME_VERSION]
  --spot                    create a Spot slice [SPOT=1]

Run:
  --config=FILE[:ARGS]      experiment config, relative to the repository (required) [CONFIG]
  --bucket=NAME             GCS bucket every worker mounts with gcsfuse [BUCKET]
  --run_name=NAME           workdir is gs://BUCKET/runs/NAME [RUN_NAME, default: config file name]
  --workdir=DIR             workdir on the workers instead; must be shared storage on a slice of
                            several hosts (one of --bucket and --workdir is required) [WORKDIR]
  --config.a.b=v            passed to main as is (ml-collections overrides)
Anything after \`--\` is passed to main as well.

Setup:
  --remote_dir=DIR          code folder on the workers, relative to home
                            [REMOTE_DIR, default trace_jax]
  --python=BIN              Python >= 3.11 on the workers, for the venv [PYTHON, default python3]
  --jax_tpu=SPEC            TPU JAX requirement [JAX_TPU, default 'jax[tpu]==0.10.2']
  --skip_copy               do not copy the code (reuse what the workers have) [SKIP_COPY=1]
  --skip_install            do not (re)install it [SKIP_INSTALL=1]
  --dry_run                 print the commands instead of running them [DRY_RUN=1]
  -h, --help                this text

Example:
  launch/tpu_pod.sh --project=my-project --zone=us-east5-a --tpu_name=trace-v5p-32 \\
    --accelerator_type=v5p-32 --runtime_version=v2-alpha-tpuv5 --bucket=my-bucket \\
    --config=configs/qwen2_5_vl_7b.py:lora_rank=16 --run_name=lora16 -- --config.optim.lr=1e-4
EOF
}

die() {
  echo "tpu_pod.sh: $*" >&2
  echo "Try 'launch/tpu_pod.sh --help'." >&2
  exit 2
}

PROJECT="${PROJECT:-}"
ZONE="${ZONE:-}"
TPU_NAME="${TPU_NAME:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
SPOT="${SPOT:-0}"
CONFIG="${CONFIG:-}"
BUCKET="${BUCKET:-}"
RUN_NAME="${RUN_NAME:-}"
WORKDIR="${WORKDIR:-}"
REMOTE_DIR="${REMOTE_DIR:-trace_jax}"
PYTHON="${PYTHON:-python3}"
JAX_TPU="${JAX_TPU:-jax[tpu]==0.10.2}"
SKIP_COPY="${SKIP_COPY:-0}"
SKIP_INSTALL="${SKIP_INSTALL:-0}"
DRY_RUN="${DRY_RUN:-0}"
EXTRA=()

while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry_run) DRY_RUN=1; shift; continue ;;
    --spot) SPOT=1; shift; continue ;;
    --skip_copy) SKIP_COPY=1; shift; continue ;;
    --skip_install) SKIP_INSTALL=1; shift; continue ;;
    --) shift; EXTRA+=("$@"); break ;;
    --config.*) EXTRA+=("$1"); shift; continue ;;
    --*=*) key="${1%%=*}"; val="${1#*=}"; shift ;;
    --*) (($# >= 2)) || die "$1 needs a value"; key="$1"; val="$2"; shift 2 ;;
    *) die "unexpected argument '$1'" ;;
  esac
  case "$key" in
    --project) PROJECT="$val" ;;
    --zone) ZONE="$val" ;;
    --tpu_name) TPU_NAME="$val" ;;
    --accelerator_type) ACCELERATOR_TYPE="$val" ;;
    --runtime_version) RUNTIME_VERSION="$val" ;;
    --config) CONFIG="$val" ;;
    --bucket) BUCKET="$val" ;;
    --run_name) RUN_NAME="$val" ;;
    --workdir) WORKDIR="$val" ;;
    --remote_dir) REMOTE_DIR="$val" ;;
    --python) PYTHON="$val" ;;
    --jax_tpu) JAX_TPU="$val" ;;
    *) die "unknown option '$key'" ;;
  esac
done

missing=()
for var in PROJECT ZONE TPU_NAME ACCELERATOR_TYPE RUNTIME_VERSION CONFIG; do
  [[ -n "${!var}" ]] || missing+=("--$(tr '[:upper:]' '[:lower:]' <<<"$var") ($var)")
done
((${#missing[@]} == 0)) || die "missing: ${missing[*]}"
[[ -n "$BUCKET" || -n "$WORKDIR" ]] || die "one of --bucket and --workdir is required"
BUCKET="${BUCKET#gs://}"
BUCKET="${BUCKET%/}"

# One word for a shell: as is when it is plain, else in single quotes (easier to read than %q).
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# The arguments as one command line for a shell.
words() {
  local word line=""
  for word in "$@"; do
    line+="${line:+ }$(quote "$word")"
  done
  printf '%s' "$line"
}

# Prints a command (quoted, ready to paste) under --dry_run; runs it otherwise.
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(words "$@")"
  else
    "$@"
  fi
}

# Every command on the slice names the same project, zone and slice.
TPU=(gcloud compute tpus tpu-vm)
WHERE=(--project="$PROJECT" --zone="$ZONE")

ensure_slice() {
  local create=("${TPU[@]}" create "$TPU_NAME" "${WHERE[@]}"
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  ((SPOT)) && create+=(--spot)
  if ((DRY_RUN)); then
    echo "# Reuses the slice when this succeeds:"
    run "${TPU[@]}" describe "$TPU_NAME" "${WHERE[@]}" --format='value(state)'
    echo "# Otherwise creates it:"
    run "${create[@]}"
  elif state="$("${TPU[@]}" describe "$TPU_NAME" "${WHERE[@]}" --format='value(state)' 2>/dev/null)"
  then
    echo "Reusing TPU slice $TPU_NAME ($state); --accelerator_type and --runtime_version unused."
    [[ "$state" == READY ]] || echo "warning: slice $TPU_NAME is $state, not READY" >&2
  else
    echo "Creating TPU slice $TPU_NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION) in $ZONE."
    run "${create[@]}"
  fi
}

copy_code() {
  local ls_files=(git -C "$REPO" ls-files -z --cached --others --exclude-standard)
  local pack=(tar -C "$REPO" --null -T - -czf "$TARBALL")
  if ((DRY_RUN)); then
    printf '%s | %s\n' "$(words "${ls_files[@]}")" "$(words "${pack[@]}")"
  else
    git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
      die "$REPO is not a git checkout: the code copied is what \`git ls-files\` lists"
    trap 'rm -f "$TARBALL"' EXIT
    "${ls_files[@]}" | "${pack[@]}"
  fi
  run "${TPU[@]}" scp "$TARBALL" "$TPU_NAME:trace_jax_code.tgz" "${WHERE[@]}" --worker=all
  # Unpacked over the previous copy, so that its .venv survives and a reinstall is quick.
  local dir
  dir="$(quote "$REMOTE_DIR")"
  run "${TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all \
    --command="mkdir -p $dir && tar -xzf trace_jax_code.tgz -C $dir"
}

install_code() {
  local script
  # shellcheck disable=SC2016  # Expanded on the workers, not here.
  script='set -euo pipefail; cd "$1"; '\
'"$2" -c "import sys; sys.exit(sys.version_info < (3, 11))" || '\
'{ echo "trace_jax needs Python >= 3.11: pass --python" >&2; exit 1; }; '\
'[[ -d .venv ]] || "$2" -m venv .venv; '\
'.venv/bin/pip install -q --upgrade pip; '\
'.venv/bin/pip install -q -r requirements.txt -e . "$3"'
  run "${TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all \
    --command="$(words bash -c "$script" _ "$REMOTE_DIR" "$PYTHON" "$JAX_TPU")"
}

install_gcsfuse() {
  # The packages.cloud.google.com recipe for gcsfuse on Debian/Ubuntu.
  local script
  # shellcheck disable=SC2016  # Expanded on the workers, not here.
  script='set -euo pipefail; command -v gcsfuse >/dev/null && exit 0; '\
'echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] '\
'https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" | '\
'sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; '\
'curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | '\
'sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; '\
'sudo apt-get update -q; sudo apt-get install -y -q gcsfuse'
  run "${TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all \
    --command="$(words bash -c "$script")"
}

train() {
  # The same command on every worker; values are shell-quoted for the remote shell.
  local env=(CONFIG="$CONFIG" BUCKET="$BUCKET" RUN_NAME="$RUN_NAME" WORKDIR="$WORKDIR")
  local command
  command="cd $(quote "$REMOTE_DIR") && $(words "${env[@]}" bash launch/worker.sh)"
  if ((${#EXTRA[@]})); then
    command+=" -- $(words "${EXTRA[@]}")"
  fi
  run "${TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command="$command"
}

TARBALL="${TMPDIR:-/tmp}/trace_jax_code_$$.tgz"
ensure_slice
((SKIP_COPY)) || copy_code
if ((!SKIP_INSTALL)); then
  install_code
  [[ -z "$BUCKET" ]] || install_gcsfuse
fi
train
