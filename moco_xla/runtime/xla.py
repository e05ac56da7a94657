"""XLA backend: TPU cores (or one XLA:CPU device for tests), started with xmp.spawn.

torch.distributed has no usable ``broadcast`` for XLA in the settings our users run,
so broadcast is built from ``xm.all_reduce`` (see Runtime.broadcast_by_all_reduce).
On a TPU pod slice the same launch command runs on every worker and torch_xla's
multi-host PJRT runtime joins them: ranks and world size come from ``torch_xla.runtime``.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Any, Callable, Iterable, Iterator, MutableMapping

import torch
import torch_xla
import torch_xla.core.xla_model as xm
import torch_xla.debug.metrics as met
import torch_xla.distributed.parallel_loader as pl
import torch_xla.runtime as xr

from . import rehearsal
from .base import _CPU_RNG_BYTES, Runtime, _check_op


class XlaRuntime(Runtime):
    """One XLA replica: a TPU core, or one of N XLA:CPU devices (a rehearsal, see rehearsal.py)."""

    name = "xla"

    def __init__(self) -> None:
        if rehearsal.requested():
            rehearsal.install()  # before this replica runs any graph
        initialize_compile_cache()  # before the first compilation too
        super().__init__(torch_xla.device(), xr.global_ordinal(), xr.world_size())
        self.rehearsal = rehearsal.requested() and self.world_size > 1
        # TPU v2/v3 and XLA:CPU run several replica threads in one process
        self.replicas_in_process = xr.addressable_device_count()
        self.first_in_process = self.device.index == 0
        self.compiles_per_thread = self.rehearsal and self.replicas_in_process > 1
        self.hosts = max(1, self.world_size // max(1, xr.local_device_count()))

    def autocast(self, precision: str) -> contextlib.AbstractContextManager:
        """bf16 autocast without its cast cache.

        The cache is process-wide while autocast's nesting counter is per thread: where
        replicas are threads of one process (TPU v2/v3, the XLA:CPU rehearsal), one replica
        would reuse (or clear) another's casts and trace another graph. Off XLA's lazy tensors
        the cache saves nothing anyway: a weight's repeated cast is one ``convert`` that the
        compiler merges, so every replica traces the same graph, every step.
        """
        if self.resolve_precision(precision) == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)

    def precise_matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a @ b`` lowered as a dot with HLO ``operand_precision={highest,highest}``, backward too.

        A TPU's default precision rounds fp32 matmul operands to bf16 (torch_xla's
        set_mat_mul_precision is process-wide and read when the whole graph is lowered, so it
        cannot single out one product): this dot is its own small XLA computation instead,
        which leaves the encoders' convolutions and matmuls at their precision."""
        with torch.autocast(a.device.type, enabled=False):
            return _HighestDot.apply(a.float(), b.float())

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """A real all-gather. xm.all_gather's default (pin_layout=True) builds it from an
        all-reduce of a zero-padded N x B buffer, which moves about twice the bytes; every
        replica here runs the same program (the rank is a tensor), so layouts agree unpinned."""
        return _in_32_bits(t, lambda x: xm.all_gather(x, dim=0, pin_layout=False))

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        _check_op(op)
        scale = 1.0 / self.world_size if op == "mean" else 1.0
        return _in_32_bits(t, lambda x: xm.all_reduce(xm.REDUCE_SUM, x, scale=scale))

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        return self.broadcast_by_all_reduce(t, src)

    def all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        return _in_32_bits(t, lambda x: xm.all_to_all(x, split_dimension=0, concat_dimension=0,
                                                      split_count=self.world_size, pin_layout=False))

    def barrier(self) -> None:
        """An all-reduce every replica must join, then read: one small graph, compiled once
        (xm.rendezvous's graph depends on what the replica ran before it, and recompiled)."""
        self.mark_step()
        done = self.all_reduce(torch.ones(1).to(self.device))
        self.mark_step()
        done.cpu()

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        xm.optimizer_step(optimizer)

    def reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        xm.reduce_gradients(optimizer)

    def mark_step(self) -> None:
        torch_xla.sync()

    def add_step_closure(self, fn: Callable[..., Any], args: tuple = ()) -> None:
        xm.add_step_closure(fn, args)

    def device_loader(self, loader: Iterable) -> Iterator:
        """MpDeviceLoader overlaps host-to-device copies with the step and cuts the graph.

        It iterates ``loader`` in a background thread, where an exception only ends the
        iteration early (and the loop would go on with a short epoch or a partial feature
        bank): the error is kept and raised here, in the replica's thread, after the last batch.
        """
        source = _KeepError(loader, self.cpu_rng)
        yield from pl.MpDeviceLoader(source, self.device)
        if source.error is not None:
            raise source.error

    # -- performance introspection: torch_xla's metrics, read on the host (no device sync) --
    def counters(self) -> dict[str, int]:
        # Replica threads of the rehearsal each count the compilations they launched; elsewhere
        # the count is the process's (one replica per process, or TPU v2/v3's threads).
        count = rehearsal.metric_count
        compiles = (rehearsal.thread_compiles(self.first_in_process) if self.compiles_per_thread
                    else count("CompileTime"))
        return {"compiles": compiles,
                "executions": count("ExecuteTime") + count("ExecuteReplicatedTime"),
                "transfers_from_device": count("TransferFromDeviceTime"),
                "fallback_ops": sum(met.counter_value(op) or 0 for op in self.fallback_ops())}

    def fallback_ops(self) -> list[str]:
        # .item() / float(t) is aten::_local_scalar_dense, listed as a fallback: it is a host
        # read, counted in transfers_from_device (and legitimate in a step closure).
        return sorted(op for op in met.executed_fallback_ops() if op != _ITEM)

    def graph_text(self, tensors: list[torch.Tensor]) -> str:
        return torch_xla._XLAC._get_xla_tensors_hlo(list(tensors))

    def wait(self) -> None:
        xm.wait_device_ops()

    def memory_stats(self) -> dict[str, int]:
        try:
            info = xm.get_memory_info(self.device)
        except RuntimeError:  # XLA:CPU has no allocator statistics
            return {}
        return {"peak_bytes": int(info.get("peak_bytes_used", info.get("bytes_used", 0))),
                "limit_bytes": int(info.get("bytes_limit", 0))}

    def start_trace(self, log_dir: str) -> None:
        """torch_xla's profiler: host spans, the lazy tracing and (on TPU) the device ops.

        The profiler is process-wide: with several replica threads in a process (TPU v2/v3)
        only the first one starts it, and the trace holds them all."""
        if not self.first_in_process:
            return
        import torch_xla.debug.profiler as xp
        xp.start_trace(log_dir)
        self._trace = xp

    def stop_trace(self) -> None:
        xp, self._trace = self._trace, None
        if xp is not None:
            xp.stop_trace()

    def save(self, obj: Any, f: Any) -> None:
        xm.save(obj, f, master_only=False)

    def rng_state(self) -> torch.Tensor:
        """CPU state, then the XLA seed (a uint64: torch.rand on the device derives from it)."""
        seed = xm.get_rng_state(self.device).to_bytes(8, "little")
        return torch.cat([self.cpu_rng_state(), torch.frombuffer(bytearray(seed), dtype=torch.uint8)])

    def set_rng_state(self, state: torch.Tensor) -> None:
        super().set_rng_state(state)
        if state.numel() == _CPU_RNG_BYTES + 8:  # else written by another backend
            seed = int.from_bytes(bytes(state[_CPU_RNG_BYTES:].tolist()), "little")
            xm.set_rng_state(seed, self.device)


def tpu_hosts() -> int:
    """TPU VMs (workers) in this slice, from the TPU metadata; 1 on a single-host TPU VM."""
    from torch_xla._internal import tpu
    try:
        return max(1, tpu.num_tpu_workers())
    except Exception:  # no metadata (not a TPU VM)
        return 1


def tpu_device_count() -> int:
    """TPU devices on this host, read from PCI without starting the runtime (safe before spawn)."""
    from torch_xla._internal import tpu
    try:
        return tpu.num_available_devices()
    except Exception:  # no TPU, or an unknown chip
        return 0


_ITEM = "aten::_local_scalar_dense"


class _HighestDot(torch.autograd.Function):
    """A 2-D matmul whose forward and backward dots run at XLA's highest precision."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return _highest_dot(a, b)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        a, b = ctx.saved_tensors
        grad_a = _highest_dot(grad, b.t()) if ctx.needs_input_grad[0] else None
        grad_b = _highest_dot(a.t(), grad) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


_DOTS: dict[tuple, Callable[[list[torch.Tensor]], list[torch.Tensor]]] = {}
_DOTS_LOCK = threading.Lock()  # replica threads of one process share the built computations


def _highest_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as an XLA user computation ``dot(..., operand_precision={highest,highest})``,
    built once per pair of shapes (the same computation, hence the same graph, on every replica)."""
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"precise_matmul takes 2-D tensors, got {tuple(a.shape)} @ {tuple(b.shape)}")
    key = (tuple(a.shape), tuple(b.shape))
    with _DOTS_LOCK:
        dot = _DOTS.get(key)
        if dot is None:
            import torch_xla.core.xla_builder as xb
            computation = xb.create_computation(
                "highest_dot", lambda x, y: xb.mkop("Dot", (x.op, y.op), precision_config="highest"),
                xb.tensor_shape([a, b]))
            dot = _DOTS[key] = xb.xla_computation_as_func(computation, "moco_xla::highest_dot")
    return dot([a, b])[0]
_WIDE_INTS = (torch.int64, torch.uint64)


def _in_32_bits(t: torch.Tensor, collective: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run ``collective`` on ``t`` with 64-bit integers carried as int32, returned in ``t``'s dtype.

    TPUs emulate 64-bit integers and their compiler has rejected 64-bit all-reduces
    (pytorch/xla#1952). The integers that cross replicas here (the queue pointer, BN's
    num_batches_tracked, class labels, counts, permutations) all fit in 31 bits.
    """
    if t.dtype not in _WIDE_INTS:
        return collective(t)
    return collective(t.to(torch.int32)).to(t.dtype)


COMPILE_CACHE_ENV = "MOCO_XLA_COMPILE_CACHE"  # a local directory, or "off"
_CACHE_LOCK = threading.Lock()


@contextlib.contextmanager
def compile_cache_environment(out: str) -> Iterator[None]:
    """Around a launch: the persistent compilation cache defaults to ``<out>/xla_cache`` on a TPU,
    so a ``--resume`` or a restarted VM with the same --out loads its graphs instead of compiling
    them (minutes for a ResNet-50). ``$MOCO_XLA_COMPILE_CACHE`` names another local directory, or
    ``off``. Not by default on XLA:CPU, which cannot load executables back."""
    default = os.environ.get("PJRT_DEVICE", "TPU").upper() != "CPU" and COMPILE_CACHE_ENV not in os.environ
    if default:
        os.environ[COMPILE_CACHE_ENV] = os.path.join(out, "xla_cache")
    try:
        yield
    finally:
        if default:
            os.environ.pop(COMPILE_CACHE_ENV, None)


def initialize_compile_cache() -> str | None:
    """Start torch_xla's persistent compilation cache in ``$MOCO_XLA_COMPILE_CACHE`` (once per
    process: replica threads share it); the directory, or None when off or already started."""
    path = os.environ.get(COMPILE_CACHE_ENV, "").strip()
    if not path or path.lower() == "off":
        return None
    if "://" in path:
        from ..errors import UserError
        raise UserError(f"{COMPILE_CACHE_ENV}={path}: the XLA compilation cache is a local directory "
                        f"(or off); checkpoints may be on gs://, the cache may not")
    with _CACHE_LOCK:
        if torch_xla._XLAC._xla_computation_cache_is_initialized():
            return None  # this process compiled before (another replica thread set it up, or a notebook)
        os.makedirs(path, exist_ok=True)
        xr.initialize_cache(path, readonly=False)
    return path


KAGGLE_ADDRESSES = "TPU_PROCESS_ADDRESSES"
_told_kaggle: list[bool] = []  # the correction is printed once per process


def correct_spawn_environment(env: MutableMapping[str, str] | None = None) -> bool:
    """Remove Kaggle's ``TPU_PROCESS_ADDRESSES=local`` before replica processes start.

    Kaggle's TPU image sets it; torch_xla fills in one address per replica process only when
    the variable is unset (``configure_topology`` uses setdefault), so with ``local`` every
    replica stops with "Expected N worker addresses, got 1". Returns True when it removed it,
    and tells the user the first time. ``env`` defaults to this process's environment, which
    xmp.spawn's processes inherit.
    """
    env = os.environ if env is None else env
    if env.get(KAGGLE_ADDRESSES, "").strip().lower() != "local":
        return False
    del env[KAGGLE_ADDRESSES]
    if not _told_kaggle:
        _told_kaggle.append(True)
        print(f"moco_xla: removed {KAGGLE_ADDRESSES}=local (set by Kaggle's TPU image) so that torch_xla "
              f"gives each replica process its own address", file=sys.stderr, flush=True)
    return True


def spawn(fn: Callable[..., Any], args: tuple, nprocs: int | None) -> None:
    """Start one replica per device (nprocs None) or a single replica (nprocs 1)."""
    import torch_xla.distributed.xla_multiprocessing as xmp
    xmp.spawn(fn, args=args, nprocs=nprocs)


class _KeepError:
    """Wraps a loader so that an exception of its iteration is stored, not lost in a thread.

    Each batch is made inside ``rng()``: the replica's own CPU RNG stream (Runtime.cpu_rng).
    """

    def __init__(self, loader: Iterable, rng: Callable[[], Any]) -> None:
        self.loader, self.rng, self.error = loader, rng, None

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        self.error = None
        try:
            it = iter(self.loader)
            while True:
                with self.rng():
                    batch = next(it, _END)
                if batch is _END:
                    return
                yield batch
        except Exception as e:  # noqa: BLE001 - re-raised by XlaRuntime.device_loader
            self.error = e


_END = object()
