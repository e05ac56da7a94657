"""Runtime backends behind one collectives interface (see base.Runtime).

This package is the only place that imports torch_xla or torch.distributed.
``launch.py`` picks a backend and starts replicas; each replica calls
``make_runtime`` and hands the result to the model and the training loop.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from ..errors import UserError
from . import detect
from .base import PRECISIONS, Runtime, resolve_precision

BACKENDS = ("auto", "xla", "torchtpu", "cuda", "cpu")


def xla_installed() -> bool:
    return importlib.util.find_spec("torch_xla") is not None


def torchtpu_installed() -> bool:
    """torch_tpu is installed (its spec only: importing it without a TPU can end the process)."""
    return detect.installed("torch_tpu")


def tpu_wanted() -> bool:
    """PJRT_DEVICE leaves the TPU in play (unset or TPU); PJRT_DEVICE=CPU/CUDA rules it out on purpose."""
    return os.environ.get("PJRT_DEVICE", "TPU").upper() == "TPU"


def tpu_available(root: str = "/") -> bool:
    """TPU chips are attached and torch_xla could drive them (files and specs only: starts nothing)."""
    return xla_installed() and tpu_wanted() and detect.scan(root).visible


def resolve_backend(backend: str, root: str = "/", metadata_url: str = detect.METADATA_URL) -> str:
    """auto -> a TPU backend when TPU chips are visible (torchtpu when torch_tpu is installed, else
    xla), else cuda when a GPU is visible, else cpu. ``--backend torchtpu`` is checked here too.

    Bounded in seconds and never a silent fallback: visible chips that no runtime can drive are a
    UserError saying why and what to do (``runtime/detect.py``); ``root`` and ``metadata_url``
    point detection at a fake tree and server in tests.
    """
    if backend == "torchtpu":
        check_torchtpu(root, metadata_url)
        return backend
    if backend != "auto":
        return backend
    if tpu_wanted():
        chips = detect.scan(root)
        if chips.visible:
            runtimes = detect.tpu_runtimes()
            runtime = runtimes[0] if runtimes else None
            problem = detect.tpu_runtime_problem(chips, runtime, metadata_url)
            if problem:
                raise UserError(f"--backend auto: {problem}")
            return runtime
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def check_torchtpu(root: str = "/", metadata_url: str = detect.METADATA_URL) -> None:
    """UserError unless torch_tpu is installed and TPU chips it can start on are visible."""
    chips = detect.scan(root)
    if not torchtpu_installed():
        found = chips.describe() if chips.visible else "no TPU chips"
        raise UserError(f"--backend torchtpu needs torch_tpu (pip install 'moco_xla[torchtpu]' on a TPU VM); "
                        f"found {found} and no torch_tpu; valid here: {', '.join(_usable_backends())}")
    if not chips.visible:
        raise UserError(f"--backend torchtpu found no TPU chips (no PCI vendor {detect.GOOGLE_PCI_VENDOR}, "
                        f"no /dev/accel* or /dev/vfio); valid here: {', '.join(_usable_backends())}")
    problem = detect.tpu_runtime_problem(chips, "torchtpu", metadata_url)
    if problem:
        raise UserError(f"--backend torchtpu: {problem}")


def _usable_backends() -> list[str]:
    """Backends that can run on this host without a TPU (for error messages)."""
    return ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]


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
    if backend == "torchtpu":
        return detect.scan().devices
    if backend == "cuda":
        from .dist import cuda_device_count
        return cuda_device_count()
    return 0


def hosts(backend: str) -> int:
    """Hosts taking part in the job: TPU VMs of a pod slice (each runs the same launch), else 1."""
    if backend == "xla" and os.environ.get("PJRT_DEVICE", "TPU").upper() == "TPU" and tpu_available():
        from .xla import tpu_hosts
        return tpu_hosts()
    if backend == "torchtpu":
        from .torchtpu import worker_hostnames
        return len(worker_hostnames())
    return 1


def make_runtime(backend: str, rank: int = 0, world_size: int = 1, local_rank: int = 0) -> Runtime:
    """The Runtime for this replica. Call it inside the replica (after spawn)."""
    if backend == "xla":
        from .xla import XlaRuntime
        return XlaRuntime()
    if backend in ("cuda", "cpu"):
        from .dist import DistRuntime
        return DistRuntime(backend, rank, world_size, local_rank)
    if backend == "torchtpu":
        from .torchtpu import TorchTpuRuntime
        return TorchTpuRuntime(rank, world_size, local_rank)
    if backend == "local":
        return Runtime(torch.device("cpu"))
    raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")


__all__ = ["Runtime", "BACKENDS", "PRECISIONS", "make_runtime", "resolve_backend", "resolve_precision",
           "available_replicas", "hosts", "tpu_available", "xla_installed", "torchtpu_installed", "check_torchtpu"]
