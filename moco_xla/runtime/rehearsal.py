"""Rehearse a multi-core TPU run on a CPU: N real XLA replicas on XLA:CPU.

``PJRT_DEVICE=CPU CPU_NUM_DEVICES=N`` gives torch_xla N CPU devices. xmp.spawn then runs
the N replicas as threads of one process sharing one PJRT CPU client whose collectives
(all-reduce, all-gather, all-to-all) are in-process: the same xmp.spawn start, the same
lowered graphs and the same xm collectives as on the TPU. torch_xla does not support
this setup by itself; it works on torch_xla 2.9 when these rules hold:

- XLA matches a collective across replicas by its op id: the HLO module's unique id, as
  torch_xla sets no channel id. So every replica must run the *same compiled executable*:
  the first one compiles, the others must find it in the graph cache. ``install`` puts one
  process-wide lock around graph execution (``_xla_step_marker``, ``_xla_sync_multi``),
  so that replicas compile one after the other and the second one hits the cache. Each
  replica first waits for its own device outside the lock: waiting inside it would block
  the replicas whose arrival the pending collective waits for.
- Host reads of XLA tensors (``item``, ``float``, ``cpu``, ...) execute pending graphs
  implicitly; they go through the same locked path first.
- ``xm.rendezvous`` and ``xm.save`` gather with the pinned all-gather, which pads by rank
  (one graph per replica); here it is routed to the real, unpinned all-gather.
- Every replica must reach each collective within XLA's hard-coded 10 s, or the process
  aborts. So at every ``mark_step`` no replica launches its graph before every replica has
  reached its own (a barrier of the replica threads in front of the lock): a replica still
  starting its DataLoader workers, loading a checkpoint or tracing then delays the others
  in Python, where waiting has no limit, instead of inside a collective. Only mark_step is
  aligned: every replica calls it at the same points, while a sync may be one replica's
  alone (``xm.save`` moves the master's tensors to the host). ``XLA_THREAD_POOL_SIZE``
  must be at least 2N (its default, the core
  count, starves replicas), and parameter aliasing is off (a replica held the GIL inside
  buffer release while a collective waited for the others).
- Graphs must be identical on every replica: the rank enters graphs as a device tensor
  (Runtime.rank_index), and bf16 autocast runs without its cast cache (XlaRuntime.autocast:
  the cache is process-wide, its nesting counter per thread), as on a TPU v2/v3.
- torch_xla counts compilations per process. Every launch runs under the lock, so the
  compilations it made are credited to the replica thread that launched it
  (``thread_compiles``): each replica's graph check sees its own, whichever replica happened
  to reach a new graph first.

All of this is private torch_xla API, verified on the versions in VERIFIED only, and active
only on XLA:CPU with more than one device. Nothing changes on a TPU.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from typing import Any, Callable, Iterator

VERIFIED = ("2.9.",)  # torch_xla releases this was verified on
_HOST_READS = ("item", "__float__", "__int__", "__bool__", "__index__", "cpu", "tolist", "numpy")
_LOCK = threading.RLock()
_installed = False
ALIGN_TIMEOUT_S = 900.0  # a barrier that long unmet is a launch only some replicas make: stop aligning
_align: threading.Barrier | None = None
_compiles_by_thread: dict[int, int] = {}  # compilations made by each replica thread's launches


def requested() -> bool:
    """True when this process is set up for several XLA:CPU replicas (read before spawn)."""
    return os.environ.get("PJRT_DEVICE", "").upper() == "CPU" and cpu_devices() > 1


def cpu_devices() -> int:
    """XLA:CPU devices torch_xla will create (``CPU_NUM_DEVICES``, default 1)."""
    try:
        return max(1, int(os.environ.get("CPU_NUM_DEVICES", "1")))
    except ValueError:
        return 1


def check_version() -> None:
    """UserError on a torch_xla release the rehearsal was not verified on."""
    import torch_xla
    from ..errors import UserError
    version = getattr(torch_xla, "__version__", "?")
    if not version.startswith(VERIFIED):
        raise UserError(f"the multi-replica XLA:CPU rehearsal relies on private torch_xla API verified on "
                        f"torch_xla {', '.join(v + 'x' for v in VERIFIED)}, found {version}; use "
                        f"CPU_NUM_DEVICES=1 (one replica) or --backend cpu (gloo processes)")


@contextlib.contextmanager
def environment(replicas: int) -> Iterator[None]:
    """Environment for ``replicas`` XLA:CPU devices around xmp.spawn (its process inherits it);
    restored afterwards, so a launch called in-process (tests, notebooks) leaves no trace."""
    pool = int(os.environ.get("XLA_THREAD_POOL_SIZE", "0") or 0)
    settings = {"CPU_NUM_DEVICES": str(replicas), "XLA_THREAD_POOL_SIZE": str(max(pool, 2 * replicas)),
                "XLA_ENABLE_PARAM_ALIASING": "0"}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def install() -> None:
    """Patch this process's torch_xla for in-process collectives (idempotent, thread-safe)."""
    global _installed
    with _LOCK:
        if _installed:
            return
        import torch
        import torch_xla
        import torch_xla.core.xla_model as xm
        check_version()
        xlac = torch_xla._XLAC
        step_marker, sync_multi = xlac._xla_step_marker, xlac._xla_sync_multi
        xlac._xla_step_marker = _serialised(step_marker, xlac, aligned=True)  # every replica: mark_step
        xlac._xla_sync_multi = _serialised(sync_multi, xlac)  # may be one replica's (xm.save's master)
        for name in _HOST_READS:
            setattr(torch.Tensor, name, _synced_read(getattr(torch.Tensor, name), sync_multi, xlac))
        xm._all_gather_using_all_reduce = _unpinned_gather(xm)
        global _align
        _align = threading.Barrier(cpu_devices())
        _installed = True


def _serialised(run: Callable[..., Any], xlac: Any, aligned: bool = False) -> Callable[..., Any]:
    """``run`` (a graph launch) under the process-wide lock, this replica's device idle before.

    The launch itself never waits under the lock (``wait=False``): its collectives need the
    other replicas, which may be queueing for the lock. A requested wait happens after it.
    """
    @functools.wraps(run)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        wait = kwargs.pop("wait", True)
        _wait_own_device(xlac)  # outside the lock
        if aligned:
            _aligned()
        with _LOCK:
            result = _credited(run, *args, wait=False, **kwargs)
        if wait:
            _wait_own_device(xlac)
        return result
    return wrapper


def _credited(run: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``run(*args, **kwargs)`` (under _LOCK), crediting its compilations to the calling thread."""
    before = _process_compiles()
    try:
        return run(*args, **kwargs)
    finally:
        ident = threading.get_ident()
        _compiles_by_thread[ident] = _compiles_by_thread.get(ident, 0) + _process_compiles() - before


def metric_count(name: str) -> int:
    """How many samples torch_xla posted to a metric in this process (0 before its first sample)."""
    import torch_xla.debug.metrics as met
    data = met.metric_data(name)
    return int(data[0]) if data else 0


def _process_compiles() -> int:
    return metric_count("CompileTime")


def thread_compiles(first_in_process: bool) -> int:
    """Graph compilations launched by the calling replica thread so far. The first replica of the
    process is also credited with those no locked launch made (none are expected), so that the
    replicas' counts always add up to the process's."""
    with _LOCK:
        own = _compiles_by_thread.get(threading.get_ident(), 0)
        if first_in_process:
            own += _process_compiles() - sum(_compiles_by_thread.values())
        return own


def _aligned() -> None:
    """Return when every replica thread has reached its next graph launch (replicas launch the same
    graphs in the same order, which the collectives already require). Should some launch ever be
    made by one replica only, the barrier breaks after ALIGN_TIMEOUT_S and launches go unaligned."""
    global _align
    barrier = _align
    if barrier is None:
        return
    try:
        barrier.wait(timeout=ALIGN_TIMEOUT_S)
    except threading.BrokenBarrierError:
        if _align is not None:
            _align = None
            warnings.warn(f"XLA:CPU rehearsal: replicas did not all reach a graph launch within "
                          f"{ALIGN_TIMEOUT_S:.0f} s; launching unaligned from now on", RuntimeWarning, stacklevel=2)


def _wait_own_device(xlac: Any) -> None:
    """Wait for this replica's device only (waiting for all would wait for the other replicas)."""
    xlac._xla_wait_device_ops(devices=xlac._xla_real_devices([xlac._xla_get_default_device()]))


def _synced_read(read: Callable[..., Any], sync_multi: Callable[..., Any], xlac: Any) -> Callable[..., Any]:
    """A host read that first launches the XLA tensor's pending graph through the locked path."""
    @functools.wraps(read)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.device.type == "xla":
            _wait_own_device(xlac)
            with _LOCK:
                _credited(sync_multi, [self], devices=[], wait=False)
            _wait_own_device(xlac)
        return read(self, *args, **kwargs)
    return wrapper


def _unpinned_gather(xm: Any) -> Callable[..., Any]:
    def gather(value: Any, dim: int = 0, groups: Any = None, pin_layout: bool = True) -> Any:
        return xm.all_gather(value, dim=dim, groups=groups, pin_layout=False)
    return gather
