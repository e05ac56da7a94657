#!/usr/bin/env bash
# Resume a run after preemption: re-create the TPU VM if it was preempted (Spot VMs end in state
# PREEMPTED and must be deleted and created again) and re-install, or start it if it was stopped;
# then restart training with `--resume auto`, which continues from the latest good checkpoint in
# --ckpt (gs://).
#
#   tpu_scripts/resume.sh --name moco --zone us-central2-b --type v4-8 --spot \
#       --config cifar10 --ckpt gs://BUCKET/cifar10 [--set ...] [--dry-run]
#
# Takes the flags of train.sh (use the same --config, --set and --ckpt as the first start), plus:
# --type, --spot, --runtime-version  for re-creating the VM (as create.sh); --type is needed then
# --git URL [--ref REF]  install from git instead of this checkout (as setup.sh)
# --recreate  delete and re-create the VM whatever its state (with --dry-run: show those steps)
# --dry-run  print the gcloud commands instead of running them (the VM state is not queried)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
HERE="$(dirname "${BASH_SOURCE[0]}")"

TYPE=""
CREATE_FLAGS=()
SETUP_FLAGS=()
RECREATE=0
normalize_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --type) need_value "$@"; check_type "$2"; CREATE_FLAGS+=(--type "$2"); shift 2 ;;
    --runtime-version) need_value "$@"; CREATE_FLAGS+=("$1" "$2"); shift 2 ;;
    --spot) CREATE_FLAGS+=(--spot); shift ;;
    --git | --ref) need_value "$@"; SETUP_FLAGS+=("$1" "$2"); shift 2 ;;
    --recreate) RECREATE=1; shift ;;
    *) parse_run_flag "$@"
      if [[ $SHIFT == 0 ]]; then parse_common "$@"; fi
      [[ $SHIFT -gt 0 ]] || bad_flag "$1" "$RUN_FLAGS, --type TYPE, --spot, --runtime-version V, --git URL, --ref REF, --recreate"
      shift "$SHIFT" ;;
  esac
done
RESUME=${RESUME:-auto}
check_run
require_gcloud

tpu_args
state="READY"
if [[ $DRY_RUN == 1 ]]; then
  run gcloud compute tpus tpu-vm describe "${TPU_ARGS[@]}" "--format=value(state)"
else
  state=$(gcloud compute tpus tpu-vm describe "${TPU_ARGS[@]}" "--format=value(state)" 2>/dev/null || echo MISSING)
  echo "TPU VM $TPU_NAME: $state" >&2
fi
[[ $RECREATE == 0 ]] || state="PREEMPTED"

common=(--name "$TPU_NAME" --zone "$ZONE")
if [[ -n $PROJECT ]]; then common+=(--project "$PROJECT"); fi
if [[ $DRY_RUN == 1 ]]; then common+=(--dry-run); fi
if [[ -n $IMAGE ]]; then SETUP_FLAGS=(--image "$IMAGE"); fi
case "$state" in
  READY) ;;
  STOPPED) run gcloud compute tpus tpu-vm start "${TPU_ARGS[@]}" ;;  # the disk and the install survive
  PREEMPTED | TERMINATED | MISSING)
    [[ -n $TYPE ]] || die "the TPU VM is $state: pass --type (and --spot) to re-create it"
    if [[ $state != MISSING ]]; then "$HERE/teardown.sh" "${common[@]}" --yes; fi
    "$HERE/create.sh" "${common[@]}" ${CREATE_FLAGS[@]+"${CREATE_FLAGS[@]}"}
    "$HERE/setup.sh" "${common[@]}" ${SETUP_FLAGS[@]+"${SETUP_FLAGS[@]}"} ;;
  *) die "the TPU VM is $state; wait until it is READY, STOPPED or PREEMPTED and run resume.sh again" ;;
esac

tpu_ssh all "$(train_command)"
