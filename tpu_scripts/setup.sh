#!/usr/bin/env bash
# Install moco_xla on every worker of a TPU VM, or pull its Docker image there.
#
#   tpu_scripts/setup.sh --name moco --zone us-central2-b                  # this checkout (git HEAD)
#   tpu_scripts/setup.sh --name moco --zone us-central2-b --git URL [--ref main]
#   tpu_scripts/setup.sh --name moco --zone us-central2-b --image us-docker.pkg.dev/P/R/moco_xla:TAG
#
# Default: uploads `git archive HEAD` of this checkout (commit first: uncommitted edits are not sent)
# to ~/moco_xla on every worker, installs gcc and libjpeg's headers (apt), then pip installs the
# package with its [xla] extra (editable):
# torch_xla[tpu] (libtpu from PyPI) with the pins of pyproject.toml, and the dependencies.
# --git URL  clone URL (at --ref, default main) on every worker instead of uploading
# --image    pull this image on every worker instead (build it from the Dockerfile and push it to
#            Artifact Registry first; see docs/deploy.md)
# --dry-run  print the git and gcloud commands instead of running them
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

GIT_URL=""
REF="main"
IMAGE=""
normalize_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --git) need_value "$@"; GIT_URL=$2; shift 2 ;;
    --ref) need_value "$@"; REF=$2; shift 2 ;;
    --image) need_value "$@"; IMAGE=$2; shift 2 ;;
    *) parse_common "$@"; [[ $SHIFT -gt 0 ]] || bad_flag "$1" "--git URL, --ref REF, --image IMAGE"; shift "$SHIFT" ;;
  esac
done
check_name
check_zone
[[ -z $GIT_URL || -z $IMAGE ]] || die "--git and --image exclude each other: install the package or pull the image"
require_gcloud

if [[ -n $IMAGE ]]; then
  registry=${IMAGE%%/*}
  login=""
  if [[ $registry == *-docker.pkg.dev || $registry == gcr.io || $registry == *.gcr.io ]]; then
    login="sudo gcloud auth configure-docker $(quote "$registry") --quiet && "
  fi
  tpu_ssh all "${login}sudo docker pull $(quote "$IMAGE")"
  exit 0
fi

# gcc and libjpeg's headers let pip build moco_xla.data._jpeg_region (decodes only the crops' rectangle of a JPEG;
# without them the install goes on and JPEGs decode whole: docs/deploy.md "The compiled module")
build_deps="{ { sudo apt-get update -q && sudo apt-get install -y -q gcc libjpeg-dev; } > /dev/null"
build_deps+=" || echo 'moco_xla: apt did not install gcc libjpeg-dev: JPEGs will decode whole'; }"
install="$build_deps && python3 -m pip install -q --extra-index-url https://download.pytorch.org/whl/cpu -e $(quote ".[xla]")"
if [[ -n $GIT_URL ]]; then
  fetch="rm -rf $REMOTE_DIR && git clone -q --branch $(quote "$REF") $(quote "$GIT_URL") $REMOTE_DIR"
else
  archive="${TMPDIR:-/tmp}/moco_xla-$(git -C "$REPO_ROOT" rev-parse --short HEAD).tar.gz"
  run git -C "$REPO_ROOT" archive --format=tar.gz -o "$archive" HEAD
  tpu_args
  run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:moco_xla.tar.gz" "${TPU_ARGS[@]:1}" --worker=all
  fetch="rm -rf $REMOTE_DIR && mkdir $REMOTE_DIR && tar -xzf moco_xla.tar.gz -C $REMOTE_DIR"
fi
tpu_ssh all "$fetch && cd $REMOTE_DIR && $install"
