"""The one collectives interface that the model and the training loop talk to.

Every backend (XLA on TPU, torch.distributed on GPU/CPU, a single local replica)
implements this class. Nothing outside ``moco_xla/runtime`` imports torch_xla or
torch.distributed, so the MoCo code reads the same on every device.

Replicas on TPU v2/v3 can be threads of one process: every piece of per-replica
state lives on a Runtime instance, never in module globals.
"""
from __future__ import annotations

import contextlib
import threading
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
        self._trace: Any = None  # a running torch.profiler session (start_trace)
        self.replicas_in_process = 1  # > 1 where replicas are threads of one process (TPU v2/v3, XLA:CPU)
        self.first_in_process = True  # the replica that runs process-wide things (profiler, counters)
        self.compiles_per_thread = False  # counters()["compiles"] counts this replica thread's only
        self.hosts = 1
        self.rehearsal = False  # several XLA:CPU replicas rehearsing a TPU run (runtime/rehearsal.py)
        self._cpu_rng_state: torch.Tensor | None = None  # private CPU RNG (see manual_seed)

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
        keep = self.rank_index.reshape(()) == src  # 0-dim: the result keeps t's shape, 0-dim included
        return self.all_reduce(torch.where(keep, t, torch.zeros_like(t)), op="sum")  # NaN elsewhere stays out

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

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler | None = None) -> None:
        """Backward, gradients averaged over replicas, optimizer step.

        With an fp16 GradScaler (CUDA) the gradients are averaged while still scaled, as DDP
        does: an overflow on one replica then reaches all of them, and every replica's
        ``scaler.step`` skips the step and lowers its scale together (the weights stay equal).
        """
        if scaler is None:
            loss.backward()
            self.optimizer_step(optimizer)
            return
        scaler.scale(loss).backward()
        self.reduce_gradients(optimizer)
        scaler.step(optimizer)  # unscales; skips the step on inf/nan
        scaler.update()

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
        self._broadcast_flat(list(module.parameters()) + list(module.buffers()))

    @torch.no_grad()
    def sync_batchnorm_stats(self, module: torch.nn.Module) -> None:
        """Give every replica the master's BatchNorm running statistics.

        Each replica's BN layers track the statistics of the batches *it* normalised, so
        they drift apart during training (the weights do not: gradients are averaged). DDP
        copies rank 0's buffers at every forward; here they are copied where they are used,
        before an evaluation and before a checkpoint, so that N replicas evaluate exactly
        what one would and a resumed run starts from what was saved.
        """
        if self.world_size == 1:
            return
        stats = [b for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)
                 for b in m.buffers()]
        self._broadcast_flat(stats)

    def _broadcast_flat(self, tensors: list[torch.Tensor]) -> None:
        """Broadcast ``tensors`` from rank 0 in place, one flattened collective per dtype."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = self.broadcast(torch.cat([t.detach().reshape(-1) for t in group]), src=0)
            offset = 0
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def mark_step(self) -> None:
        """End of one traced step (cuts the lazy graph on XLA; nothing elsewhere)."""

    def add_step_closure(self, fn: Callable[..., Any], args: tuple = ()) -> None:
        """Run ``fn(*args)`` once the step's tensors are materialised (at once off XLA)."""
        fn(*args)

    def device_loader(self, loader: Iterable) -> Iterator:
        """Yield the loader's batches on this replica's device."""
        for batch in loader:
            yield _to_device(batch, self.device)

    # -- precision --------------------------------------------------------------
    def precise_matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a @ b`` of 2-D tensors in full fp32, outside any autocast: for the few products whose
        rounding matters (contrastive logits, kNN similarities), never for the encoders."""
        with torch.autocast(a.device.type, enabled=False):
            return a.float() @ b.float()

    def resolve_precision(self, precision: str) -> str:
        """``train.precision`` for this backend: auto becomes its default; UserError if unsupported."""
        return resolve_precision(self.name, precision)

    def autocast(self, precision: str) -> contextlib.AbstractContextManager:
        """Mixed-precision context for the forward pass; fp32 is a no-op.

        Under bf16/fp16 the convolutions and matmuls of the encoders run in the low
        precision; MoCo computes its logits, softmax and loss in fp32 (see moco.py).
        """
        precision = self.resolve_precision(precision)
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def grad_scaler(self, precision: str) -> torch.amp.GradScaler | None:
        """A GradScaler for fp16 on CUDA; None otherwise (bf16 and fp32 need none)."""
        return None

    def compile_backend(self, requested: str) -> str:
        """The torch.compile backend for ``train.compile_backend`` here (TorchTPU: its own)."""
        return requested

    # -- performance introspection (see profiling.py) ----------------------------
    def counters(self) -> dict[str, int]:
        """Cumulative graph counters: compiles, executions, fallback_ops, transfers_from_device.

        Empty off XLA: eager backends have no graph to recompile and no op falls back.
        """
        return {}

    def fallback_ops(self) -> list[str]:
        """Names of the ops that ran on the host instead of the device so far (XLA only)."""
        return []

    def graph_text(self, tensors: list[torch.Tensor]) -> str:
        """The lowered program that computes ``tensors`` (HLO text on XLA; empty elsewhere)."""
        return ""

    def wait(self) -> None:
        """Block until the device finished all queued work (for timing; never in the step)."""

    def memory_stats(self) -> dict[str, int]:
        """Device memory in bytes (``peak_bytes``, ``limit_bytes``) where the device reports it."""
        return {}

    def start_trace(self, log_dir: str) -> None:
        """Start a profiler trace written to ``log_dir`` (torch.profiler; XLA uses its own)."""
        from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._trace = profile(activities=activities, record_shapes=True,
                              on_trace_ready=tensorboard_trace_handler(log_dir, f"rank{self.rank}"))
        self._trace.__enter__()

    def stop_trace(self) -> None:
        """Stop the trace and write it (TensorBoard's profile plugin reads the folder)."""
        trace, self._trace = self._trace, None
        if trace is not None:
            trace.__exit__(None, None, None)

    def save(self, obj: Any, f: Any) -> None:
        """Write ``obj`` with torch.save (after moving device tensors to the CPU on XLA)."""
        torch.save(obj, f)

    # -- random numbers -----------------------------------------------------------
    # torch's CPU generator is process-wide. Where replicas are threads of one process
    # (TPU v2/v3, the XLA:CPU rehearsal) each replica keeps a private CPU RNG state instead,
    # swapped in around its own draws (cpu_rng), so its augmentations and checkpointed RNG
    # state do not depend on how the threads interleave.
    def manual_seed(self, seed: int) -> None:
        """Seed this replica's CPU RNG (the process's, or its private one when threads share it)."""
        if self.replicas_in_process > 1:
            self._cpu_rng_state = torch.Generator().manual_seed(seed).get_state()
        else:
            torch.manual_seed(seed)

    @contextlib.contextmanager
    def cpu_rng(self) -> Iterator[None]:
        """Draws from torch's global CPU RNG inside this block use this replica's own stream."""
        if self._cpu_rng_state is None:
            yield
            return
        with _RNG_LOCK:
            outside = torch.get_rng_state()
            torch.set_rng_state(self._cpu_rng_state)
            try:
                yield
            finally:
                self._cpu_rng_state = torch.get_rng_state()
                torch.set_rng_state(outside)

    def cpu_rng_state(self) -> torch.Tensor:
        return torch.get_rng_state() if self._cpu_rng_state is None else self._cpu_rng_state.clone()

    def set_cpu_rng_state(self, state: torch.Tensor) -> None:
        if self._cpu_rng_state is None:
            torch.set_rng_state(state.clone())
        else:
            self._cpu_rng_state = state.clone()

    def rng_state(self) -> torch.Tensor:
        """This replica's RNG state (torch CPU, then the device's) as one uint8 CPU tensor.

        Same length on every replica of a job, so checkpoints can all_gather it.
        """
        return self.cpu_rng_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restore what ``rng_state`` returned (resuming a checkpoint)."""
        self.set_cpu_rng_state(state[:_CPU_RNG_BYTES])

    def shutdown(self) -> None:
        """Release process-group resources."""

    def describe(self) -> str:
        return f"{self.name} rank {self.rank}/{self.world_size} on {self.device}"


_CPU_RNG_BYTES = torch.get_rng_state().numel()
_RNG_LOCK = threading.Lock()  # process-wide: guards swapping a replica's CPU RNG state in and out

# train.precision per backend. auto: bf16 on XLA (the MXU's native type, no loss scaling),
# bf16 or fp16 on CUDA (see DistRuntime), fp32 on CPU (bf16 there is opt-in).
PRECISIONS = {"xla": ("fp32", "bf16"), "cuda": ("fp32", "bf16", "fp16"), "cpu": ("fp32", "bf16"),
              "local": ("fp32", "bf16"), "torchtpu": ("fp32", "bf16")}
AUTO_PRECISION = {"xla": "bf16", "cuda": "bf16", "cpu": "fp32", "local": "fp32", "torchtpu": "bf16"}


def resolve_precision(backend: str, precision: str) -> str:
    """The precision ``backend`` runs for ``train.precision``; UserError for a combination it lacks."""
    from ..errors import UserError
    valid = PRECISIONS.get(backend, ("fp32",))
    if precision == "auto":
        return AUTO_PRECISION.get(backend, "fp32")
    if precision not in valid:
        why = " (fp16 needs a GradScaler, which only CUDA has here)" if precision == "fp16" else ""
        raise UserError(f"train.precision={precision} is not supported on backend {backend}{why}; "
                        f"valid: auto, {', '.join(valid)}")
    return precision


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
