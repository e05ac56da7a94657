"""torch.distributed backend: NCCL on CUDA GPUs, gloo on CPU.

Replicas are processes, started by torch.multiprocessing (see launch.py) or by
torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT.
"""
from __future__ import annotations

import contextlib
import os
import weakref
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from .base import _CPU_RNG_BYTES, Runtime, _check_op

# DDP's bucket sizes: a small first bucket starts communication early in the backward pass,
# larger ones after it keep the number of collectives (and their latency) low.
FIRST_BUCKET_BYTES = 1 << 20
BUCKET_BYTES = 25 << 20
PROCESS_GROUPS = {"cuda": "nccl", "cpu": "gloo", "torchtpu": "tpu_dist"}


class _Bucket:
    """A few parameters' gradients in one flat buffer: one all_reduce for all of them."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.buffer = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype,
                                  device=params[0].device)
        self.views, offset = [], 0
        for p in params:
            self.views.append(self.buffer[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        self.pending = len(params)
        self.work: dist.Work | None = None


class GradientBuckets:
    """Gradient averaging that overlaps the backward pass: DDP's buckets, as parameter hooks.

    Why hooks and not DDP around the query encoder: the module tree (and so checkpoints,
    kNN and evaluation, which read ``encoder_q.backbone``) stays as it is, ``encoder_k``
    stays a plain deepcopy updated from ``encoder_q.parameters()``, and the symmetric loss
    may call the encoder twice before its one backward (autograd sums both uses before a
    parameter's hook fires once). A post-accumulate-grad hook copies each gradient, divided
    by the world size, into its bucket; a bucket whose gradients are all in starts an async
    all_reduce (buckets start in index order, the same on every replica) while backward goes
    on. ``finish`` waits and hands the averaged buffers to ``.grad`` (as views: no copy back).
    Buckets follow the parameters in reverse order (about the order backward produces their
    gradients), then, after the first step, the order the gradients really came in
    (rank 0's, broadcast once), as DDP rebuilds its buckets.
    """

    def __init__(self, params: list[torch.Tensor], world_size: int,
                 first_bytes: int = FIRST_BUCKET_BYTES, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.params = list(dict.fromkeys(p for p in params if p.requires_grad))
        self.world_size = world_size
        self.first_bytes, self.bucket_bytes = first_bytes, bucket_bytes
        self._index = {p: i for i, p in enumerate(self.params)}
        self._layout(list(reversed(range(len(self.params)))))
        self._armed, self._rebuilt = False, False
        self._reset()
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def covers(self, params: list[torch.Tensor]) -> bool:
        """True when these buckets hold exactly ``params`` (an optimizer's, unchanged)."""
        mine = [p for p in params if p.requires_grad]
        return len(mine) == len(self.params) and all(a is b for a, b in zip(mine, self.params))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextlib.contextmanager
    def overlapping(self) -> Iterator[None]:
        """Hooks act only inside this block: other backward passes on the same parameters
        (probes, fine-tuning, tests) leave the buckets alone."""
        self._reset()
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    def finish(self) -> None:
        """After backward: start what has not started, wait for every bucket, set ``.grad``.

        A parameter that got no gradient here contributes zeros (every replica issues the
        same collectives) and keeps ``.grad`` None, as ``Runtime.reduce_gradients`` does.
        """
        for b in range(self._next, len(self.buckets)):
            bucket = self.buckets[b]
            for p, view in zip(bucket.params, bucket.views):
                if not self._fired[self._index[p]]:
                    if p.grad is None:
                        view.zero_()
                    else:
                        torch.div(p.grad, self.world_size, out=view)
            bucket.pending = 0
        self._launch_in_order()
        for bucket in self.buckets:
            bucket.work.wait()
            for p, view in zip(bucket.params, bucket.views):
                if p.grad is None or p.grad is view:
                    continue
                if p.grad.stride() == view.stride():
                    p.grad = view  # the averaged buffer becomes the gradient (gradient_as_bucket_view)
                else:
                    p.grad.copy_(view)  # e.g. channels-last weights keep their gradient's layout
        if not self._rebuilt:
            self._rebuild()

    def report(self) -> dict[str, list[int]]:
        """Bucket sizes (elements) and, per bucket, how many gradients were ready when its
        all_reduce started in the last step (fewer than all of them: it overlapped backward)."""
        return {"bucket_numel": [b.buffer.numel() for b in self.buckets],
                "ready_at_launch": list(self.launched_at), "gradients": [len(self.params)]}

    # -- internals ----------------------------------------------------------------
    def _layout(self, order: list[int]) -> None:
        self._layout_order = order
        self.buckets: list[_Bucket] = []
        self._slot: list[tuple[_Bucket, torch.Tensor]] = [None] * len(self.params)  # type: ignore[list-item]
        group: list[torch.Tensor] = []
        size, cap = 0, self.first_bytes
        for i in order + [-1]:
            p = self.params[i] if i >= 0 else None
            if group and (p is None or size >= cap or p.dtype != group[0].dtype or p.device != group[0].device):
                self.buckets.append(_Bucket(group))
                group, size, cap = [], 0, self.bucket_bytes
            if p is not None:
                group.append(p)
                size += p.numel() * p.element_size()
        for bucket in self.buckets:
            for p, view in zip(bucket.params, bucket.views):
                self._slot[self._index[p]] = (bucket, view)

    def _reset(self) -> None:
        self._fired = [False] * len(self.params)
        self._order: list[int] = []
        self._next = 0
        self.launched_at: list[int] = []
        for bucket in self.buckets:
            bucket.pending, bucket.work = len(bucket.params), None

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._armed:
            return
        i = self._index[p]
        if self._fired[i]:
            raise RuntimeError("a parameter's gradient was accumulated twice in one backward_step "
                               "(two backward passes before one step are not supported)")
        self._fired[i] = True
        self._order.append(i)
        bucket, view = self._slot[i]
        torch.div(p.grad, self.world_size, out=view)
        bucket.pending -= 1
        if bucket.pending == 0:
            self._launch_in_order()

    def _launch_in_order(self) -> None:
        while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:
            self.buckets[self._next].work = dist.all_reduce(self.buckets[self._next].buffer, async_op=True)
            self.launched_at.append(len(self._order))
            self._next += 1

    def _rebuild(self) -> None:
        """Once: lay the buckets out in the order gradients came (rank 0's, broadcast)."""
        self._rebuilt = True  # (launched_at stays: it reports the step just run)
        if not self.params:
            return
        seen = set(self._order)
        order = self._order + [i for i in reversed(range(len(self.params))) if i not in seen]
        t = torch.tensor(order, dtype=torch.long, device=self.params[0].device)
        dist.broadcast(t, src=0)
        order = t.tolist()
        if order != self._layout_order:
            self._layout(order)


class DistRuntime(Runtime):
    """One process of a torch.distributed job (``cuda``: NCCL, ``cpu``: gloo; TorchTpuRuntime: tpu_dist)."""

    def __init__(self, backend: str, rank: int, world_size: int, local_rank: int, *,
                 device: torch.device | None = None, process_group: str | None = None) -> None:
        """``device`` and ``process_group`` default to the backend's (cuda: this GPU and NCCL,
        cpu: the CPU and gloo); TorchTpuRuntime passes "tpu" and "tpu_dist"."""
        if device is None and backend == "cuda":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
            torch.backends.cudnn.benchmark = True  # static shapes: autotune each convolution once
        device = device or torch.device("cpu")
        super().__init__(device, rank, world_size)
        self.name = backend
        self.process_group = process_group or PROCESS_GROUPS[backend]
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group(
                self.process_group, rank=rank, world_size=world_size, timeout=timedelta(minutes=30),
                device_id=device if self.process_group == "nccl" else None,
            )
        self._multi = world_size > 1
        # one GradientBuckets per optimizer that backward_step has seen (dropped with it)
        self._grad_syncs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.first_bucket_bytes, self.bucket_bytes = FIRST_BUCKET_BYTES, BUCKET_BYTES

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

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler | None = None) -> None:
        """Backward with the gradient all-reduce overlapping it (GradientBuckets), then the step.

        With an fp16 GradScaler the buckets hold the scaled gradients, as in
        ``Runtime.backward_step``: an overflow on one replica skips the step on all.
        """
        if not self._multi:
            super().backward_step(loss, optimizer, scaler)
            return
        sync = self.gradient_buckets(optimizer)
        with sync.overlapping():
            (loss if scaler is None else scaler.scale(loss)).backward()
        sync.finish()
        if scaler is None:
            optimizer.step()
            return
        scaler.step(optimizer)  # unscales; skips the step on inf/nan
        scaler.update()

    def gradient_buckets(self, optimizer: torch.optim.Optimizer) -> GradientBuckets:
        """This optimizer's buckets, made on first use (again if its parameters changed)."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        sync = self._grad_syncs.get(optimizer)
        if sync is None or not sync.covers(params):
            if sync is not None:
                sync.close()
            sync = GradientBuckets(params, self.world_size, self.first_bucket_bytes, self.bucket_bytes)
            self._grad_syncs[optimizer] = sync
        return sync

    def ddp(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` under torch's DistributedDataParallel with its defaults, as the official
        MoCo code wraps its model (the benchmark's reference step; moco_xla itself uses
        GradientBuckets). One process alone gets a one-rank group, as DDP on one GPU does."""
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.name == "cuda" else "gloo", store=dist.HashStore(),
                                    rank=0, world_size=1)
        ids = [self.device.index] if self.name == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)

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
        return torch.cat([self.cpu_rng_state(), torch.cuda.get_rng_state(self.device)])

    def set_rng_state(self, state: torch.Tensor) -> None:
        super().set_rng_state(state)
        if self.name == "cuda" and state.numel() > _CPU_RNG_BYTES:  # else written by another backend
            torch.cuda.set_rng_state(state[_CPU_RNG_BYTES:].clone(), self.device)

    def shutdown(self) -> None:
        if dist.is_initialized():
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
