#!/usr/bin/env bash
# Delete a TPU VM. Checkpoints and shards in gs:// stay; outputs on the VM's disk are lost.
#
#   tpu_scripts/teardown.sh --name moco --zone us-central2-b [--yes] [--dry-run]
#
# --yes      do not ask for confirmation
# --dry-run  print the gcloud command instead of running it
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

YES=0
normalize_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --yes) YES=1; shift ;;
    *) parse_common "$@"; [[ $SHIFT -gt 0 ]] || bad_flag "$1" "--yes"; shift "$SHIFT" ;;
  esac
done
check_name
check_zone
require_gcloud

tpu_args
delete=(gcloud compute tpus tpu-vm delete "${TPU_ARGS[@]}")
if [[ $YES == 1 ]]; then delete+=(--quiet); fi
run "${delete[@]}"
