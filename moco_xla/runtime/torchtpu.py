"""TorchTPU backend: a TPU chip as a plain torch.distributed device (PyTorch/XLA's successor).

On TorchTPU (``pip install torch-tpu``) a chip is ``torch.device("tpu")`` and the chips of a job
form a ``"tpu_dist"`` process group with broadcast, all_gather_into_tensor, all_reduce,
all_to_all_single and barrier, so the replica is ``DistRuntime`` with another device and process
group: one process per chip (no set_device), started by torch.multiprocessing after
``torch.tpu.distributed.set_tpu_launch_env(nproc_per_node=N)`` (or under torchrun after
``python -m torch.tpu.distributed`` exported that environment). What differs from CUDA:
bf16 autocast only (no fp16), ``torch.compile`` with the "tpu" backend (inductor refuses TPU
tensors), fp32 matmuls in one bf16 pass unless asked for the highest precision
(``precise_matmul``), checkpoints written from CPU copies, the device RNG in ``rng_state``.

Nothing here imports torch_tpu at module level: with torch_tpu installed but no libtpu,
importing it ends the process, and with no TPU the first TPU tensor hangs (runtime/detect.py
checks both before a replica starts). The replica-count rules and the launch plan are plain
Python, tested without a TPU.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..errors import UserError
from .base import _CPU_RNG_BYTES
from .detect import TpuChips
from .dist import DistRuntime

PROCESS_GROUP = "tpu_dist"
DEVICE = "tpu"
COMPILE_BACKEND = "tpu"
POD_MASTER_PORT = "8476"  # torch.distributed rendezvous on worker 0 of a pod slice
# Processes one TPU VM can run, by generation: TorchTPU splits a host's chips only this way
# (v5e/v6e hosts of 8 chips: 1, 4 or 8; v4/v5p hosts of 4: 1, 2 or 4, and 8 on v5p-16 hosts).
REPLICA_COUNTS = {"v5e": (1, 4, 8), "v6e": (1, 4, 8), "v4": (1, 2, 4, 8), "v5p": (1, 2, 4, 8)}


def allowed_replicas(chips: TpuChips) -> tuple[int, ...]:
    """The ``--cores`` values this host's chips allow (an unknown generation: 1 or all)."""
    have = chips.count
    generation = chips.generations[0] if chips.generations else ""
    counts = REPLICA_COUNTS.get(generation, (1, have))
    return tuple(sorted({n for n in counts if 1 <= n <= have}))


def replica_count(cores: int | None, chips: TpuChips) -> int:
    """Validate ``--cores`` for TorchTPU on this host (None: every chip); UserError if not allowed."""
    allowed = allowed_replicas(chips)
    if not allowed:
        raise UserError("--backend torchtpu found no TPU chips on the PCI bus; valid here: cpu")
    if cores is None:
        return allowed[-1]
    if cores not in allowed:
        kind = chips.generations[0]
        raise UserError(f"--cores {cores} is not a process count TorchTPU runs on this {kind} host of "
                        f"{chips.count} chip(s); valid: {', '.join(map(str, allowed))}")
    return cores


def worker_hostnames(env: Mapping[str, str] = os.environ) -> list[str]:
    """The TPU VMs of a pod slice, from TPU_WORKER_HOSTNAMES (one name on a single host)."""
    names = [h.strip() for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return names or ["localhost"]


@dataclass(frozen=True)
class LaunchPlan:
    """Where this host's processes sit in the job: ranks first_rank .. first_rank + nproc - 1."""

    nproc_per_node: int
    hosts: int
    worker_id: int
    master_addr: str

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.hosts

    @property
    def first_rank(self) -> int:
        return self.worker_id * self.nproc_per_node


def launch_plan(nproc_per_node: int, env: Mapping[str, str] = os.environ) -> LaunchPlan:
    """The job this host joins: every worker of a pod slice runs the same launch with the same
    ``nproc_per_node``; TPU_WORKER_ID says which block of ranks is this host's."""
    names = worker_hostnames(env)
    worker = int(env.get("TPU_WORKER_ID", "0") or 0)
    if not 0 <= worker < len(names):
        raise UserError(f"TPU_WORKER_ID={worker} is outside TPU_WORKER_HOSTNAMES ({len(names)} host(s))")
    master = "127.0.0.1" if len(names) == 1 else names[0]
    return LaunchPlan(nproc_per_node, len(names), worker, master)


def set_launch_env(plan: LaunchPlan) -> None:
    """Before spawning: TorchTPU's own launch environment (chip per process, the pod's topology),
    then the torch.distributed rendezvous of a pod (MASTER_ADDR: worker 0, a port every host agrees
    on; a single host picks a free port when it spawns)."""
    tpu = _torch_tpu()
    tpu.distributed.set_tpu_launch_env(nproc_per_node=plan.nproc_per_node)
    if plan.hosts > 1:
        os.environ.setdefault("MASTER_ADDR", plan.master_addr)
        os.environ.setdefault("MASTER_PORT", POD_MASTER_PORT)


def _torch_tpu() -> Any:
    """``torch.tpu`` (registered by torch_tpu). Only after runtime/detect.py found chips and libtpu."""
    importlib.import_module("torch_tpu")
    return torch.tpu  # type: ignore[attr-defined]


class TorchTpuRuntime(DistRuntime):
    """One TorchTPU process: a chip, in the ``tpu_dist`` process group.

    ``device`` and ``process_group`` exist so that tests run this class's whole contract on the
    CPU with gloo; a real run keeps the defaults.
    """

    def __init__(self, rank: int, world_size: int, local_rank: int,
                 device: torch.device | None = None, process_group: str = PROCESS_GROUP) -> None:
        if device is None:
            _torch_tpu()
            device = torch.device(DEVICE)
        super().__init__("torchtpu", rank, world_size, local_rank, device=device, process_group=process_group)

    def resolve_precision(self, precision: str) -> str:
        """auto is bf16 (the MXU's type); fp16 is refused (TorchTPU has no fp16 autocast)."""
        if precision == "auto":
            return "bf16"
        if precision not in ("fp32", "bf16"):
            raise UserError(f"train.precision={precision} is not supported on backend torchtpu; "
                            f"valid: auto, fp32, bf16")
        return precision

    def compile_backend(self, requested: str) -> str:
        """torch.compile on TPU tensors needs TorchTPU's backend (inductor refuses them)."""
        return COMPILE_BACKEND

    def precise_matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a @ b`` in fp32 at the highest precision (the TPU default is one bf16 pass): the
        process-wide setting is raised for this product only and restored after; one TorchTPU
        process drives one chip, so no other thread sees it."""
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            return super().precise_matmul(a, b)
        finally:
            torch.set_float32_matmul_precision(before)

    def save(self, obj: Any, f: Any) -> None:
        """torch.save of a CPU copy: a checkpoint loads anywhere, and no device buffer is pickled."""
        torch.save(to_cpu(obj), f)

    def rng_state(self) -> torch.Tensor:
        """The CPU RNG state, then the chip's (when the device module keeps one)."""
        device_state = self._device_rng()
        if device_state is None:
            return super().rng_state()
        return torch.cat([self.cpu_rng_state(), device_state])

    def set_rng_state(self, state: torch.Tensor) -> None:
        super().set_rng_state(state)
        module = _device_module(self.device)
        if module is not None and state.numel() > _CPU_RNG_BYTES:  # else written by another backend
            module.set_rng_state(state[_CPU_RNG_BYTES:].clone())

    def _device_rng(self) -> torch.Tensor | None:
        module = _device_module(self.device)
        return None if module is None else module.get_rng_state().to("cpu", torch.uint8)

    def describe(self) -> str:
        return f"torchtpu rank {self.rank}/{self.world_size} on {self.device} ({self.process_group})"


def _device_module(device: torch.device) -> Any:
    """torch's module for ``device`` (torch.tpu) when it keeps an RNG; None on the CPU (tests)."""
    if device.type == "cpu":
        return None
    module = torch.get_device_module(device)
    return module if hasattr(module, "get_rng_state") and hasattr(module, "set_rng_state") else None


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in it (dicts, lists, tuples) replaced by a CPU copy."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return type(obj)((k, to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_cpu(v) for v in obj)
    return obj
