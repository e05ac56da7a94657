"""Runtime backends behind one collectives interface (see base.Runtime).

This package is the only place that imports torch_xla or torch.distributed.
``launch.py`` picks a backend and starts replicas; each replica calls
``make_runtime`` and hands the result to the model and the training loop.
"""
from __future__ import annotations

import glob
import importlib.util
import os

import torch

from .base import PRECISIONS, Runtime, resolve_precision

BACKENDS = ("auto", "xla", "cuda", "cpu")


def xla_installed() -> bool:
    return importlib.util.find_spec("torch_xla") is not None


def tpu_available() -> bool:
    """A TPU is attached (read from PCI; does not start the XLA runtime)."""
    if not xla_installed():
        return False
    if os.environ.get("PJRT_DEVICE", "TPU").upper() != "TPU":
        return False
    if not (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
        return False  # no TPU device files: skip importing torch_xla at all
    from .xla import tpu_device_count
    return tpu_device_count() > 0


def resolve_backend(backend: str) -> str:
    """auto -> xla when a TPU is attached, else cuda when a GPU is visible, else cpu."""
    if backend != "auto":
        return backend
    if tpu_available():
        return "xla"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def available_replicas(backend: str) -> int:
    """How many replicas this host can run for ``backend`` (CPU: any number, reported as 0).

    XLA:CPU: ``CPU_NUM_DEVICES`` devices (default 1), each a replica of a rehearsal.
    """
    if backend == "xla":
        if os.environ.get("PJRT_DEVICE", "").upper() == "CPU":
            from .rehearsal import cpu_devices
            return cpu_devices()
        from .xla import tpu_device_count
        return tpu_device_count()
    if backend == "cuda":
        from .dist import cuda_device_count
        return cuda_device_count()
    return 0


def hosts(backend: str) -> int:
    """Hosts taking part in the job: TPU VMs of a pod slice (each runs the same launch), else 1."""
    if backend == "xla" and os.environ.get("PJRT_DEVICE", "TPU").upper() == "TPU" and tpu_available():
        from .xla import tpu_hosts
        return tpu_hosts()
    return 1


def make_runtime(backend: str, rank: int = 0, world_size: int = 1, local_rank: int = 0) -> Runtime:
    """The Runtime for this replica. Call it inside the replica (after spawn)."""
    if backend == "xla":
        from .xla import XlaRuntime
        return XlaRuntime()
    if backend in ("cuda", "cpu"):
        from .dist import DistRuntime
        return DistRuntime(backend, rank, world_size, local_rank)
    if backend == "local":
        return Runtime(torch.device("cpu"))
    raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")


__all__ = ["Runtime", "BACKENDS", "PRECISIONS", "make_runtime", "resolve_backend", "resolve_precision",
           "available_replicas", "hosts", "tpu_available", "xla_installed"]
