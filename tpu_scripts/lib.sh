# shellcheck shell=bash disable=SC2034  # the variables set here are read by the scripts that source it
# Shared by the tpu_scripts: flag parsing, validation, dry-run, and the gcloud calls they all make.
#
# Every command with an effect goes through `run`, so `--dry-run` prints the exact gcloud, ssh or
# git command line (shell-quoted, one per line, ready to paste) and runs nothing. Bad input ends
# with one line `error: ...` on stderr and exit status 2, like `python -m moco_xla.launch`.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
TPU_NAME="${MOCO_TPU_NAME:-}"
ZONE="${MOCO_TPU_ZONE:-}"
PROJECT="${MOCO_TPU_PROJECT:-}"
COMMON_FLAGS="--name NAME, --zone ZONE, --project PROJECT, --dry-run, --help"
REMOTE_DIR="moco_xla"   # the checkout on every worker, in the ssh user's home
RUNS_DIR="moco_xla_runs"  # run outputs and logs on every worker, next to it (setup.sh replaces the checkout)

die() {
  echo "error: $*" >&2
  exit 2
}

# The comment block at the top of the calling script (up to its shellcheck directive).
usage() {
  sed -n '2,$ {/^# shellcheck/q;/^#/!q;s/^# \{0,1\}//;p;}' "$0"
}

# Split --flag=value into --flag value so every script parses one form.
normalize_args() {
  ARGS=()
  local a
  for a in "$@"; do
    if [[ $a == --*=* ]]; then ARGS+=("${a%%=*}" "${a#*=}"); else ARGS+=("$a"); fi
  done
}

need_value() {
  [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value"
}

# Handle a flag every script takes; sets SHIFT to the arguments consumed (0: not a common flag).
parse_common() {
  SHIFT=1
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --name) need_value "$@"; TPU_NAME=$2; SHIFT=2 ;;
    --zone) need_value "$@"; ZONE=$2; SHIFT=2 ;;
    --project) need_value "$@"; PROJECT=$2; SHIFT=2 ;;
    -h | --help) usage; exit 0 ;;
    *) SHIFT=0 ;;
  esac
}

bad_flag() {
  die "unknown flag '$1' for $(basename "$0"); valid: $2, $COMMON_FLAGS"
}

# Quote one word for a POSIX shell only where needed, so printed commands stay readable.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(quote "$w")"; done
  printf '%s' "$out"
}

# Run a command, or print it under --dry-run.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    quote_all "$@"
    echo
  else
    echo "+ $(quote_all "$@")" >&2
    "$@"
  fi
}

require_gcloud() {
  [[ $DRY_RUN == 1 ]] || command -v gcloud >/dev/null ||
    die "gcloud not found; install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"
}

check_name() {
  [[ -n $TPU_NAME ]] || die "--name is required (or set MOCO_TPU_NAME)"
  [[ $TPU_NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    die "--name '$TPU_NAME' is not a valid TPU name; valid: lowercase letters, digits and '-', starting with a letter"
}

check_zone() {
  [[ -n $ZONE ]] || die "--zone is required (or set MOCO_TPU_ZONE), e.g. us-central2-b"
  [[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone '$ZONE' is not a zone; valid: e.g. us-central2-b, europe-west4-a"
}

check_gs() {  # check_gs FLAG VALUE
  [[ $2 =~ ^gs://[a-z0-9][-_.a-z0-9]{1,220}[a-z0-9](/.*)?$ ]] || die "$1 '$2' must be a gs://bucket/path URL"
}

# The gcloud flags naming the TPU VM: NAME --zone ZONE [--project PROJECT].
tpu_args() {
  TPU_ARGS=("$TPU_NAME" "--zone=$ZONE")
  if [[ -n $PROJECT ]]; then TPU_ARGS+=("--project=$PROJECT"); fi
}

# tpu_ssh WORKER COMMAND: run a bash command line on one worker (0, 1, ...) or all of them.
tpu_ssh() {
  tpu_args
  run gcloud compute tpus tpu-vm ssh "${TPU_ARGS[@]}" "--worker=$1" --command "$2"
}

# The pin of a package in requirements.txt, so the VM installs exactly what the tests ran with.
pinned() {
  local v
  v=$(sed -n "s/^$1==\([^ ;#]*\).*/\1/p" "$REPO_ROOT/requirements.txt")
  [[ -n $v ]] || die "requirements.txt has no $1==VERSION pin"
  printf '%s' "$v"
}

# Default runtime version and zone for a TPU generation (cloud.google.com/tpu/docs/runtimes).
runtime_for() {
  case "$1" in
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
  esac
}

zone_for() {
  case "$1" in
    v2-* | v3-*) echo "europe-west4-a" ;;
    v4-*) echo "us-central2-b" ;;
    v5litepod-*) echo "us-west4-a" ;;
    v5p-*) echo "us-east5-a" ;;
    v6e-*) echo "us-east1-d" ;;
  esac
}

# v5e-8 is the name people use; gcloud calls it v5litepod-8.
check_type() {
  local t=${1/#v5e-/v5litepod-}
  [[ $t =~ ^(v2|v3|v4|v5litepod|v5p|v6e)-[0-9]+$ ]] ||
    die "--type '$1' is not a TPU type; valid: v3-8, v4-8, v5e-8 (v5litepod-8), v5p-8, v6e-8 or a larger slice such as v4-32"
  TYPE=$t
}

# Settings of a training run, shared by train.sh and resume.sh.
RUN_FLAGS="--config NAME, --run NAME, --ckpt gs://..., --set KEY=VALUE, --image IMAGE, --resume auto|PATH, --foreground"
CONFIG=""
RUN_NAME=""
CKPT=""
IMAGE=""
RESUME=""
FOREGROUND=0
OVERRIDES=()

parse_run_flag() {
  SHIFT=2
  case "$1" in
    --config) need_value "$@"; CONFIG=$2 ;;
    --run) need_value "$@"; RUN_NAME=$2 ;;
    --ckpt) need_value "$@"; CKPT=$2 ;;
    --set) need_value "$@"; OVERRIDES+=("$2") ;;
    --image) need_value "$@"; IMAGE=$2 ;;
    --resume) need_value "$@"; RESUME=$2 ;;
    --foreground) FOREGROUND=1; SHIFT=1 ;;
    *) SHIFT=0 ;;
  esac
}

check_run() {
  check_name
  check_zone
  [[ -n $CONFIG ]] || die "--config is required: a name in moco_xla/configs/ (e.g. cifar10) or a .yaml path inside the repo"
  RUN_NAME=${RUN_NAME:-$CONFIG}
  [[ $RUN_NAME =~ ^[A-Za-z0-9][-_.A-Za-z0-9]*$ ]] || die "--run '$RUN_NAME' may hold only letters, digits, '-', '_', '.'"
  [[ -n $CKPT ]] || die "--ckpt gs://BUCKET/PATH is required: checkpoints must outlive a preempted VM"
  check_gs --ckpt "$CKPT"
  local o
  for o in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
    [[ $o == *=* ]] || die "--set '$o' must look like section.key=value (e.g. train.lr=0.03)"
  done
}

# The launcher's arguments for this run: config, output, checkpoint bucket, overrides, resume.
launch_args() {  # launch_args OUT_DIR
  LAUNCH=(--config "$CONFIG" --out "$1" --set "checkpoint.dir=$CKPT")
  local o
  for o in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do LAUNCH+=(--set "$o"); done
  if [[ -n $RESUME ]]; then LAUNCH+=(--resume "$RESUME"); fi
}

# The bash command line each worker runs: the launcher on every TPU core of that host (pip install
# or --image), detached from the ssh session unless --foreground; logs.sh follows its output.
train_command() {
  local cmd
  if [[ -n $IMAGE ]]; then
    launch_args "/runs/$RUN_NAME"
    cmd="mkdir -p $RUNS_DIR && { sudo docker rm -f moco-$RUN_NAME >/dev/null 2>&1 || true; } && sudo docker run"
    [[ $FOREGROUND == 1 ]] || cmd+=" -d"
    cmd+=" --name moco-$RUN_NAME --privileged --net host --shm-size 16g -v \"\$HOME/$RUNS_DIR:/runs\""
    printf '%s %s %s' "$cmd" "$(quote "$IMAGE")" "$(quote_all "${LAUNCH[@]}")"
    return
  fi
  local dir="../$RUNS_DIR/$RUN_NAME"
  launch_args "$dir"
  cmd="cd $REMOTE_DIR && mkdir -p $dir && "
  if [[ $FOREGROUND == 1 ]]; then
    printf 'set -o pipefail; %spython3 -m moco_xla.launch %s 2>&1 | tee -a %s/train.log' \
      "$cmd" "$(quote_all "${LAUNCH[@]}")" "$dir"
  else
    printf '%snohup python3 -m moco_xla.launch %s >> %s/train.log 2>&1 < /dev/null &' \
      "$cmd" "$(quote_all "${LAUNCH[@]}")" "$dir"
  fi
}
