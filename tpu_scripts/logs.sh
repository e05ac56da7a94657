#!/usr/bin/env bash
# Follow the output of a training run on a TPU worker.
#
#   tpu_scripts/logs.sh --name moco --zone us-central2-b --run cifar10 [--worker auto] [--no-follow]
#
# --run      the run name given to train.sh (default there: the config name)
# --worker   which worker, all, or auto (default): the worker whose run directory holds
#            metrics.jsonl, i.e. the host of global ordinal 0, which prints the progress and
#            writes the records. It need not be worker 0, and may change after a resume.
# --image    the run was started with --image: read the container's log
# --lines    lines of history to show first (default 100)
# --no-follow  print and exit instead of following
# --dry-run  print the gcloud command instead of running it
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RUN_NAME=""
WORKER=auto
IMAGE=""
LINES=100
FOLLOW=1
normalize_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --run) need_value "$@"; RUN_NAME=$2; shift 2 ;;
    --worker) need_value "$@"; WORKER=$2; shift 2 ;;
    --image) need_value "$@"; IMAGE=$2; shift 2 ;;
    --lines) need_value "$@"; LINES=$2; shift 2 ;;
    --no-follow) FOLLOW=0; shift ;;
    *) parse_common "$@"; [[ $SHIFT -gt 0 ]] ||
      bad_flag "$1" "--run NAME, --worker N|all, --image IMAGE, --lines N, --no-follow"
      shift "$SHIFT" ;;
  esac
done
check_name
check_zone
[[ -n $RUN_NAME ]] || die "--run is required: the run name given to train.sh (default there: the config name)"
[[ $RUN_NAME =~ ^[A-Za-z0-9][-_.A-Za-z0-9]*$ ]] || die "--run '$RUN_NAME' may hold only letters, digits, '-', '_', '.'"
[[ $WORKER == all || $WORKER == auto || $WORKER =~ ^[0-9]+$ ]] ||
  die "--worker '$WORKER' is not valid; valid: auto, all, 0, 1, ..."
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines '$LINES' must be a number"
require_gcloud

if [[ -n $IMAGE ]]; then
  cmd="sudo docker logs --tail $LINES"
  [[ $FOLLOW == 0 ]] || cmd+=" --follow"
  cmd+=" moco-$RUN_NAME"
else
  cmd="tail -n $LINES"
  [[ $FOLLOW == 0 ]] || cmd+=" -F"
  cmd+=" $RUNS_DIR/$RUN_NAME/train.log"
fi
if [[ $WORKER == auto ]]; then  # every worker checks; only the one writing the records follows
  cmd="[ -e $RUNS_DIR/$RUN_NAME/metrics.jsonl ] || exit 0; echo \"== \$(hostname) writes $RUN_NAME's records ==\"; $cmd"
  WORKER=all
fi
tpu_ssh "$WORKER" "$cmd"
