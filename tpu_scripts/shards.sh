#!/usr/bin/env bash
# Pack a dataset into WebDataset tar shards in a bucket, for streaming to every TPU worker.
#
#   tpu_scripts/shards.sh --dataset cifar10 --root ~/data/cifar10 --out gs://BUCKET/cifar10 \
#       [--split train] [--name moco --zone us-central2-b] [--create-bucket] [--dry-run]
#
# Runs `python -m moco_xla.shards` here, or with --name on worker 0 of the TPU VM (next to the
# bucket, and --root is a path on that VM). Shard once per split (train, then test).
# --dataset  a dataset name of moco_xla (mnist, emnist, cifar10, imagenet, imagenet-mini, folder)
# --root     where the dataset's files are (local path)
# --out      gs://BUCKET/PREFIX for the shards
# --split    train or test (default train)
# --shard-size  samples per shard (default: the moco_xla.shards default)
# --create-bucket  create the bucket first, in the region of --zone (or --location)
# --dry-run  print the commands instead of running them
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DATASET=""
ROOT=""
OUT=""
SPLIT="train"
SHARD_SIZE=""
CREATE_BUCKET=0
LOCATION=""
normalize_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dataset) need_value "$@"; DATASET=$2; shift 2 ;;
    --root) need_value "$@"; ROOT=$2; shift 2 ;;
    --out) need_value "$@"; OUT=$2; shift 2 ;;
    --split) need_value "$@"; SPLIT=$2; shift 2 ;;
    --shard-size) need_value "$@"; SHARD_SIZE=$2; shift 2 ;;
    --create-bucket) CREATE_BUCKET=1; shift ;;
    --location) need_value "$@"; LOCATION=$2; shift 2 ;;
    *) parse_common "$@"; [[ $SHIFT -gt 0 ]] ||
      bad_flag "$1" "--dataset NAME, --root PATH, --out gs://..., --split train|test, --shard-size N, --create-bucket, --location REGION"
      shift "$SHIFT" ;;
  esac
done
[[ -n $DATASET ]] || die "--dataset is required; valid: mnist, emnist, cifar10, imagenet, imagenet-mini, folder"
[[ -n $ROOT ]] || die "--root is required: the directory holding the dataset's files"
[[ -n $OUT ]] || die "--out gs://BUCKET/PREFIX is required"
check_gs --out "$OUT"
[[ $SPLIT == train || $SPLIT == test ]] || die "--split '$SPLIT' is not valid; valid: train, test"
[[ -z $SHARD_SIZE || $SHARD_SIZE =~ ^[1-9][0-9]*$ ]] || die "--shard-size '$SHARD_SIZE' must be a positive integer"
if [[ -n $TPU_NAME || $CREATE_BUCKET == 1 && -z $LOCATION ]]; then check_zone; fi
if [[ -n $TPU_NAME ]]; then check_name; fi
require_gcloud

if [[ $CREATE_BUCKET == 1 ]]; then
  bucket=${OUT#gs://}
  bucket="gs://${bucket%%/*}"
  location=${LOCATION:-${ZONE%-*}}
  create=(gcloud storage buckets create "$bucket" "--location=$location" --uniform-bucket-level-access)
  if [[ -n $PROJECT ]]; then create+=("--project=$PROJECT"); fi
  run "${create[@]}"
fi

shards=(-m moco_xla.shards --dataset "$DATASET" --root "$ROOT" --out "$OUT" --split "$SPLIT")
if [[ -n $SHARD_SIZE ]]; then shards+=(--shard-size "$SHARD_SIZE"); fi
if [[ -n $TPU_NAME ]]; then
  tpu_ssh 0 "cd $REMOTE_DIR && python3 $(quote_all "${shards[@]}")"
else
  run python3 "${shards[@]}"
fi
