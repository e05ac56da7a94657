# moco_xla for Cloud TPU VMs: PyTorch/XLA with libtpu from PyPI, entrypoint `python -m moco_xla.launch`.
#
#   docker build -t moco_xla .
#   sudo docker run --rm --privileged --net host --shm-size 16g -v "$HOME/runs:/runs" moco_xla \
#       --config cifar10 --out /runs/cifar10 --set checkpoint.dir=gs://BUCKET/cifar10
#
# --privileged exposes the TPU chips (/dev/accel* or /dev/vfio) to the container; --net host lets
# the replicas of a pod slice find each other and gcsfs reach the VM's metadata server for credentials.
# See docs/deploy.md.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PJRT_DEVICE=TPU

WORKDIR /app

# The framework layer first: it changes only when the pins do, so code edits rebuild in seconds.
# Keep these three pins equal to the [xla] extra and requirements.txt (tests/test_docker.py checks).
# The CPU wheel index supplies torch without the CUDA libraries a TPU VM never uses; libtpu comes
# with torch_xla[tpu].
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu \
        torch==2.9.0 torchvision==0.24.0 "torch_xla[tpu]==2.9.0"

COPY requirements.txt ./
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu --requirement requirements.txt

# The package through its [xla] extra (everything is already satisfied by the layers above). A
# regular install: the configs ship inside the package, so /app need not stay on the path.
# (DL3013 asks for a pin: the pins of a local project are its pyproject's.)
# gcc and libjpeg's headers build moco_xla.data._jpeg_region (CropViews decodes only the crops'
# rectangle of each JPEG); the build tools leave again in the same layer, the library stays.
COPY pyproject.toml setup.py README.md ./
COPY moco_xla ./moco_xla
# hadolint ignore=DL3008,DL3013
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libjpeg62-turbo-dev \
    && pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[xla]" \
    && python -I -c "import moco_xla.data._jpeg_region" \
    && apt-get purge -y --auto-remove gcc libc6-dev libjpeg62-turbo-dev \
    && apt-get install -y --no-install-recommends libjpeg62-turbo \
    && rm -rf /var/lib/apt/lists/*

ENTRYPOINT ["python", "-m", "moco_xla.launch"]
CMD ["--help"]
