"""The one collectives interface that the model and the training loop talk to.

Every backend (XLA on TPU, torch.distributed on GPU/CPU, a single local replica)
implements this class. Nothing outside ``moco_xla/runtime`` imports torch_xla or
torch.distributed, so the MoCo code reads the same on every device.

Replicas on TPU v2/v3 can be threads of one process: every piece of per-replica
state lives on a Runtime instance, never in module globals.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import torch


class Runtime:
    """Base class: one replica's view of the job. Defaults are the one-replica identity."""

    name = "local"

    def __init__(self, device: torch.device, rank: int = 0, world_size: int = 1) -> None:
        self.device = device
        self.rank = rank
        self.world_size = world_size
        # The rank as a device tensor: indexing with it keeps the XLA graph identical on
        # every replica (a Python int would be baked in as a constant, one graph per replica).
        self._rank_index: torch.Tensor | None = None

    # -- identity ---------------------------------------------------------------
    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def rank_index(self) -> torch.Tensor:
        if self._rank_index is None:
            self._rank_index = torch.tensor([self.rank], dtype=torch.long, device=self.device)
        return self._rank_index

    # -- collectives ------------------------------------------------------------
    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate ``t`` from every replica along dim 0 (rank order)."""
        return t

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (``op='sum'``) or average (``op='mean'``) ``t`` over replicas; returns a new tensor."""
        _check_op(op)
        return t.clone()

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Every replica gets replica ``src``'s ``t``."""
        return t.clone()

    def broadcast_by_all_reduce(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Broadcast built from all_reduce: every replica but ``src`` contributes zeros.

        This is how XLA broadcasts (there is no torch.distributed broadcast there); the
        select keeps the graph the same on every replica and costs one all_reduce.
        """
        keep = (self.rank_index == src).to(t.dtype)
        return self.all_reduce(t * keep, op="sum")

    def all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        """Split dim 0 into ``world_size`` chunks; chunk j goes to replica j, received in rank order."""
        return t.clone()

    @property
    def has_all_to_all(self) -> bool:
        return True

    def barrier(self) -> None:
        """Wait until every replica gets here."""

    # -- training helpers -------------------------------------------------------
    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Average gradients over replicas, then step."""
        if self.world_size > 1:
            self.reduce_gradients(optimizer)
        optimizer.step()

    def reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Average every gradient over replicas in one flattened all_reduce."""
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = self.all_reduce(flat, op="mean")
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    @torch.no_grad()
    def sync_module(self, module: torch.nn.Module) -> None:
        """Copy the master's parameters and buffers to every replica (start of training)."""
        if self.world_size == 1:
            return
        for t in list(module.parameters()) + list(module.buffers()):
            t.copy_(self.broadcast(t, src=0))

    def mark_step(self) -> None:
        """End of one traced step (cuts the lazy graph on XLA; nothing elsewhere)."""

    def add_step_closure(self, fn: Callable[..., Any], args: tuple = ()) -> None:
        """Run ``fn(*args)`` once the step's tensors are materialised (at once off XLA)."""
        fn(*args)

    def device_loader(self, loader: Iterable) -> Iterator:
        """Yield the loader's batches on this replica's device."""
        for batch in loader:
            yield _to_device(batch, self.device)

    def autocast(self, precision: str) -> contextlib.AbstractContextManager:
        """Mixed-precision context for the forward pass; fp32 is a no-op."""
        if precision in ("fp32", "auto"):
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def grad_scaler(self, precision: str) -> torch.amp.GradScaler | None:
        """A GradScaler for fp16 on CUDA; None otherwise (bf16 and fp32 need none)."""
        return None

    def save(self, obj: Any, f: Any) -> None:
        """Write ``obj`` with torch.save (after moving device tensors to the CPU on XLA)."""
        torch.save(obj, f)

    def rng_state(self) -> torch.Tensor:
        """This replica's RNG state (torch CPU, then the device's) as one uint8 CPU tensor.

        Same length on every replica of a job, so checkpoints can all_gather it.
        """
        return torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restore what ``rng_state`` returned (resuming a checkpoint)."""
        torch.set_rng_state(state[:_CPU_RNG_BYTES].clone())

    def shutdown(self) -> None:
        """Release process-group resources."""

    def describe(self) -> str:
        return f"{self.name} rank {self.rank}/{self.world_size} on {self.device}"


_CPU_RNG_BYTES = torch.get_rng_state().numel()


def _check_op(op: str) -> None:
    if op not in ("sum", "mean"):
        raise ValueError(f"all_reduce op {op!r} is not one of: sum, mean")


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch
