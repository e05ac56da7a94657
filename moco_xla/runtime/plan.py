"""Replica planning: how many replicas this host starts and how many the job has, before any starts.

``plan_replicas`` is what ``moco_xla.launch`` and ``moco_xla.eval`` both do with ``--backend`` and
``--cores``: resolve the backend, check the core count against what this host has, multiply by
the hosts of a TPU pod slice, or, under torchrun, take the rank and world size from its
environment (then this process is one replica).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import UserError
from . import available_replicas, hosts, resolve_backend, xla_installed
from .dist import env_rank


@dataclass(frozen=True)
class ReplicaPlan:
    backend: str    # xla | cuda | cpu (resolved: never auto)
    cores: int      # replicas started on this host (under torchrun: the world, this process one of them)
    world: int      # replicas of the whole job
    reports: bool   # this process prints results and writes the run directory (not a torchrun rank > 0)

    @property
    def hosts(self) -> int:
        return self.world // self.cores


def plan_replicas(backend: str, cores: int | None) -> ReplicaPlan:
    """``--backend`` and ``--cores`` checked against this host (and torchrun's environment); UserError if not."""
    backend = resolve_backend(backend)
    env = env_rank()
    if env is None:
        cores = replica_count(backend, cores)
        return ReplicaPlan(backend, cores, world_size(backend, cores), True)
    rank, world, _ = env
    if backend == "xla":
        raise UserError("torchrun drives the cpu/cuda backends; on TPUs use --cores (xmp.spawn)")
    if cores is not None and cores != world:
        raise UserError(f"--cores {cores} disagrees with torchrun's WORLD_SIZE={world}")
    return ReplicaPlan(backend, world, world, rank == 0)


def replica_count(backend: str, cores: int | None) -> int:
    """Validate ``--cores`` against what the backend can run on this host; UserError if not.

    XLA: PJRT runs one replica per device or a single one. What a TPU VM exposes: v2-8 and
    v3-8 8 devices (2 cores per chip), v4-8 and v5p-8 4 (one megacore per chip), v5e-8 and
    v6e-8 8, v5e-1 1. Omitting ``--cores`` takes them all. On XLA:CPU (``PJRT_DEVICE=CPU``)
    ``--cores N`` rehearses an N-core run on N XLA:CPU devices (``CPU_NUM_DEVICES=N``).
    """
    if cores is not None and cores < 1:
        raise UserError(f"--cores must be >= 1, got {cores}")
    if backend == "xla":
        return _xla_cores(cores)
    if backend == "torchtpu":
        from . import detect, torchtpu
        return torchtpu.replica_count(cores, detect.scan())
    if backend == "cuda":
        have = available_replicas("cuda")
        if have == 0:
            raise UserError("--backend cuda found no CUDA GPU; valid here: cpu" +
                            (", xla" if xla_installed() else ""))
        cores = have if cores is None else cores
        if cores > have:
            raise UserError(f"--cores {cores} exceeds the {have} visible CUDA GPU(s)")
        return cores
    return 1 if cores is None else cores


def _xla_cores(cores: int | None) -> int:
    if not xla_installed():
        raise UserError("--backend xla needs torch_xla (pip install torch_xla); valid here: cuda, cpu")
    xla_cpu = os.environ.get("PJRT_DEVICE", "").upper() == "CPU"
    if xla_cpu and cores and "CPU_NUM_DEVICES" not in os.environ:
        return cores  # a rehearsal of a `cores`-core TPU run on as many XLA:CPU devices
    have = available_replicas("xla")
    if have == 0:
        raise UserError("--backend xla found no TPU; set PJRT_DEVICE=CPU for XLA:CPU "
                        "(CPU_NUM_DEVICES=N for N replicas) or use --backend cpu")
    cores = have if cores is None else cores
    if cores not in (1, have):
        where = "CPU_NUM_DEVICES" if xla_cpu else "PJRT"
        raise UserError(f"--cores {cores} is not available on XLA: {where} exposes {have} device(s) on "
                        f"this host; use --cores {have} or --cores 1 (or omit --cores to take all)")
    return cores


def world_size(backend: str, cores: int) -> int:
    """Replicas of the whole job: this host's ``cores`` times the hosts of a TPU pod slice.

    UserError for ``--cores 1`` on a pod slice (every worker must run all its cores).
    """
    n_hosts = hosts(backend)
    if n_hosts > 1 and cores == 1:
        raise UserError(f"--cores 1 on a TPU pod slice of {n_hosts} hosts: every worker runs all its "
                        f"cores; omit --cores")
    return cores * n_hosts
