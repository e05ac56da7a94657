#!/usr/bin/env bash
# Follow a training run on a TPU VM or pod slice: its output (train.log) on the worker that writes the
# records, or its records (metrics.jsonl) in the bucket, whichever host writes them.
#
#   tpu_scripts/logs.sh --name moco --zone us-central2-b --run cifar10 [--ckpt gs://...] [--worker auto]
#   tpu_scripts/logs.sh --ckpt gs://BUCKET/runs/cifar10 --records [--no-follow]
#
# --run      the run name given to train.sh (default there: the config name)
# --ckpt     the run's gs:// checkpoint directory (train.sh --ckpt): its records/ folder holds
#            metrics.jsonl, summary.json, TensorBoard and plots, and names the host that writes them
# --worker   which worker, all, or auto (default): the worker that writes the records, i.e. the
#            host of global ordinal 0, which prints the progress. It need not be worker 0, and may
#            change after a resume. Found by the hostname in <ckpt>/records/host (with --ckpt), else
#            by the metrics.jsonl in the worker's run directory.
# --records  print <ckpt>/records/metrics.jsonl from the bucket (no ssh; --name and --zone not
#            needed), then every --every seconds (default 30) what was added
# --image    the run was started with --image: read the container's log
# --lines    lines of history to show first (default 100)
# --no-follow  print and exit instead of following
# --dry-run  print the gcloud command instead of running it
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RUN_NAME=""
CKPT=""
WORKER=auto
RECORDS=0
EVERY=30
IMAGE=""
LINES=100
FOLLOW=1
normalize_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --run) need_value "$@"; RUN_NAME=$2; shift 2 ;;
    --ckpt) need_value "$@"; CKPT=$2; shift 2 ;;
    --worker) need_value "$@"; WORKER=$2; shift 2 ;;
    --records) RECORDS=1; shift ;;
    --every) need_value "$@"; EVERY=$2; shift 2 ;;
    --image) need_value "$@"; IMAGE=$2; shift 2 ;;
    --lines) need_value "$@"; LINES=$2; shift 2 ;;
    --no-follow) FOLLOW=0; shift ;;
    *) parse_common "$@"; [[ $SHIFT -gt 0 ]] ||
      bad_flag "$1" "--run NAME, --ckpt gs://..., --worker N|all|auto, --records, --every S, --image IMAGE, --lines N, --no-follow"
      shift "$SHIFT" ;;
  esac
done
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines '$LINES' must be a number"
[[ $EVERY =~ ^[1-9][0-9]*$ ]] || die "--every '$EVERY' must be a whole number of seconds, 1 or more"
if [[ -n $CKPT ]]; then check_gs --ckpt "$CKPT"; fi
RECORDS_URL="${CKPT%/}/records"

# Print the bucket's metrics.jsonl (its last --lines), then what each upload adds. The run uploads
# whole files, so a line seen before is still there unless a resumed run rewrote the file from its
# checkpoint's step: then the tail is printed again under a notice.
follow_records() {
  local url="$RECORDS_URL/metrics.jsonl" seen=-1 last="" n
  if [[ $DRY_RUN == 1 ]]; then
    run gcloud storage cat "$url"
    return
  fi
  TMP=$(mktemp)
  trap 'rm -f "$TMP"' EXIT
  while :; do
    if gcloud storage cat "$url" >"$TMP" 2>/dev/null; then
      n=$(wc -l <"$TMP" | tr -d ' ')
      if ((seen < 0)); then
        tail -n "$LINES" "$TMP"
      elif ((seen == 0)) || { ((n >= seen)) && [[ $(sed -n "${seen}p" "$TMP") == "$last" ]]; }; then
        tail -n +"$((seen + 1))" "$TMP"
      else
        echo "== $url was rewritten: a resumed run continues from its checkpoint =="
        tail -n "$LINES" "$TMP"
      fi
      seen=$n
      last=$( ((n == 0)) || sed -n "${n}p" "$TMP")
    elif ((seen == -1)); then
      [[ $FOLLOW == 1 ]] || die "no records at $url (is --ckpt the run's checkpoint.dir, and has it started?)"
      echo "== no records at $url yet; waiting ==" >&2
      seen=-2
    fi
    [[ $FOLLOW == 1 ]] || return 0
    sleep "$EVERY"
  done
}

if [[ $RECORDS == 1 ]]; then
  [[ -n $CKPT ]] || die "--records needs --ckpt gs://BUCKET/PATH: the run's checkpoint.dir"
  require_gcloud
  follow_records
  exit 0
fi

check_name
check_zone
[[ -n $RUN_NAME ]] || die "--run is required: the run name given to train.sh (default there: the config name)"
[[ $RUN_NAME =~ ^[A-Za-z0-9][-_.A-Za-z0-9]*$ ]] || die "--run '$RUN_NAME' may hold only letters, digits, '-', '_', '.'"
[[ $WORKER == all || $WORKER == auto || $WORKER =~ ^[0-9]+$ ]] ||
  die "--worker '$WORKER' is not valid; valid: auto, all, 0, 1, ..."
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
  is_writer="[ -e $RUNS_DIR/$RUN_NAME/metrics.jsonl ]"
  if [[ -n $CKPT ]]; then  # the host named in the bucket; without that file, the local check
    is_writer="w=\$(gcloud storage cat $(quote "$RECORDS_URL/host") 2>/dev/null); if [ -n \"\$w\" ]; then [ \"\$w\" = \"\$(hostname)\" ]; else $is_writer; fi"
  fi
  cmd="{ $is_writer; } || exit 0; echo \"== \$(hostname) writes $RUN_NAME's records ==\"; $cmd"
  WORKER=all
fi
tpu_ssh "$WORKER" "$cmd"
