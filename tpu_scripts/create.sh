#!/usr/bin/env bash
# Create a Cloud TPU VM (a single host such as v4-8, or a pod slice such as v4-32).
#
#   tpu_scripts/create.sh --name moco --type v4-8 [--zone us-central2-b] [--spot] [--dry-run]
#
# --type     v3-8, v4-8, v5e-8 (= v5litepod-8), v5p-8, v6e-8, or a larger slice (v4-32, ...)
# --zone     default: a zone that offers the type (v3: europe-west4-a, v4: us-central2-b,
#            v5e: us-west4-a, v5p: us-east5-a, v6e: us-east1-d)
# --runtime-version  default: the PyTorch runtime for the type (tpu-ubuntu2204-base for v2-v4,
#            v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e)
# --spot     a Spot VM: much cheaper, may be preempted at any time (see resume.sh)
# --project  default: gcloud's configured project
# --dry-run  print the gcloud command instead of running it
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TYPE=""
RUNTIME=""
SPOT=0
normalize_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --type) need_value "$@"; check_type "$2"; shift 2 ;;
    --runtime-version) need_value "$@"; RUNTIME=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    *) parse_common "$@"; [[ $SHIFT -gt 0 ]] || bad_flag "$1" "--type TYPE, --runtime-version VERSION, --spot"; shift "$SHIFT" ;;
  esac
done

[[ -n $TYPE ]] || die "--type is required; valid: v3-8, v4-8, v5e-8 (v5litepod-8), v5p-8, v6e-8 or a larger slice"
ZONE=${ZONE:-$(zone_for "$TYPE")}
RUNTIME=${RUNTIME:-$(runtime_for "$TYPE")}
check_name
check_zone
require_gcloud

tpu_args
create=(gcloud compute tpus tpu-vm create "${TPU_ARGS[@]}" "--accelerator-type=$TYPE" "--version=$RUNTIME")
if [[ $SPOT == 1 ]]; then create+=(--spot); fi
run "${create[@]}"
