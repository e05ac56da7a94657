#!/usr/bin/env bash
# Start training on every worker of a TPU VM or pod slice: each worker runs the launcher on all of
# its TPU cores, and torch_xla's PJRT runtime joins the workers into one job.
#
#   tpu_scripts/train.sh --name moco --zone us-central2-b --config cifar10 \
#       --ckpt gs://BUCKET/cifar10 [--set data.root=gs://BUCKET/shards/cifar10] [--dry-run]
#
# --config   a config in moco_xla/configs/ (name, or a .yaml path inside the repo)
# --ckpt     gs:// directory for checkpoints (checkpoint.dir): they survive preemption and teardown
# --set      a config override KEY=VALUE, repeatable (see moco_xla/configs/README.md)
# --run      run name (default: the config name): outputs and train.log in ~/moco_xla_runs/RUN
# --image    run in this Docker image (pulled by setup.sh --image) instead of the pip install
# --resume   auto (latest checkpoint in --ckpt) or a checkpoint path; resume.sh passes auto
# --foreground  stay attached and stream the output (default: detached; follow with logs.sh)
# --dry-run  print the gcloud command instead of running it
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

normalize_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [[ $# -gt 0 ]]; do
  parse_run_flag "$@"
  if [[ $SHIFT == 0 ]]; then parse_common "$@"; fi
  [[ $SHIFT -gt 0 ]] || bad_flag "$1" "$RUN_FLAGS"
  shift "$SHIFT"
done
check_run
require_gcloud

tpu_ssh all "$(train_command)"
