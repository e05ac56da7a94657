"""torch.distributed backend: NCCL on CUDA GPUs, gloo on CPU.

Replicas are processes, started by torch.multiprocessing (see launch.py) or by
torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .base import _CPU_RNG_BYTES, Runtime, _check_op


class DistRuntime(Runtime):
    """One process of a torch.distributed job (``cuda``: NCCL, ``cpu``: gloo)."""

    def __init__(self, backend: str, rank: int, world_size: int, local_rank: int) -> None:
        if backend == "cuda":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        super().__init__(device, rank, world_size)
        self.name = backend
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group(
                "nccl" if backend == "cuda" else "gloo",
                rank=rank, world_size=world_size, timeout=timedelta(minutes=30),
                device_id=device if backend == "cuda" else None,
            )
        self._multi = world_size > 1

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        if not self._multi:
            return t
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous())
        return torch.cat(out, dim=0)

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        _check_op(op)
        out = t.clone()
        if self._multi:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
            if op == "mean":
                out /= self.world_size
        return out

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        out = t.clone().contiguous()
        if self._multi:
            dist.broadcast(out, src=src)
        return out

    def all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(t)
        if not self._multi:
            return t.clone()
        dist.all_to_all_single(out, t.contiguous())
        return out

    def barrier(self) -> None:
        if self._multi:
            dist.barrier()

    def resolve_precision(self, precision: str) -> str:
        """auto on CUDA: bf16 where the GPU has it (Ampere and later), else fp16 with a GradScaler."""
        if self.name == "cuda" and precision == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return super().resolve_precision(precision)

    def grad_scaler(self, precision: str) -> torch.amp.GradScaler | None:
        if self.name == "cuda" and self.resolve_precision(precision) == "fp16":
            return torch.amp.GradScaler("cuda")
        return None

    def wait(self) -> None:
        if self.name == "cuda":
            torch.cuda.synchronize(self.device)

    def memory_stats(self) -> dict[str, int]:
        if self.name != "cuda":
            return {}
        return {"peak_bytes": torch.cuda.max_memory_allocated(self.device),
                "limit_bytes": torch.cuda.get_device_properties(self.device).total_memory}

    def rng_state(self) -> torch.Tensor:
        if self.name != "cuda":
            return super().rng_state()
        return torch.cat([torch.get_rng_state(), torch.cuda.get_rng_state(self.device)])

    def set_rng_state(self, state: torch.Tensor) -> None:
        super().set_rng_state(state)
        if self.name == "cuda" and state.numel() > _CPU_RNG_BYTES:  # else written by another backend
            torch.cuda.set_rng_state(state[_CPU_RNG_BYTES:].clone(), self.device)

    def shutdown(self) -> None:
        if self._multi and dist.is_initialized():
            dist.destroy_process_group()


def env_rank() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun's environment, or None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
