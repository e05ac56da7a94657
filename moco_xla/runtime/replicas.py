"""Start the replicas of a job and learn why they stopped: one way for XLA, CUDA and gloo.

Both CLIs (``moco_xla.launch`` and ``moco_xla.eval``) hand ``start`` a picklable
``body(backend, rank, world, local_rank, *args)``; it runs once per replica:
- under torchrun (RANK/WORLD_SIZE set) this process *is* one replica;
- XLA: ``xmp.spawn`` starts one replica per device (TPU cores, or N XLA:CPU devices for
  a rehearsal); on TPU v2/v3 and XLA:CPU the replicas are threads of one process;
- CUDA / CPU: one torch.multiprocessing process per replica (NCCL / gloo).

A replica that stops for a reason the user must see (bad input, NaN loss, preemption:
``RunStopped``) writes a report file before it exits (a file: no lock a killed peer could
leak). The parent waits ``REPLICA_GRACE_S`` for the others, which block in their next
collective if they did not stop at the same step, then kills them, and raises the lowest
rank's report. SIGTERM in the parent is forwarded to the replicas, which agree on a step,
checkpoint and exit 75.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import torch

from ..errors import NonFiniteLoss, Preempted, RunStopped, UserError

Body = Callable[..., Any]  # body(backend, rank, world, local_rank, *args)

# Set by SIGTERM in this process. Process-wide on purpose: signals reach processes, and
# replica threads of one process (TPU v2/v3, XLA:CPU) share it.
_STOP = threading.Event()
REPLICA_GRACE_S = 120.0  # a stopping replica waits this long for the others before they are killed
REHEARSAL_GRACE_S = 2.0  # the same on XLA:CPU, which aborts on its own after 10 s


class ReplicaCrashed(RunStopped):
    """A replica raised an unexpected exception (a bug): its traceback is printed above."""


def stop_requested() -> bool:
    """True once this process received SIGTERM (the training loop polls it)."""
    return _STOP.is_set()


def install_stop_handler() -> None:
    """SIGTERM asks this process's replicas to stop at the next agreed step (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: _STOP.set())


def start(backend: str, cores: int, body: Body, args: tuple = ()) -> None:
    """Run ``body`` on ``cores`` replicas of ``backend`` on this host and wait for them.

    Raises RunStopped (UserError, NonFiniteLoss, Preempted, ...) with the replicas' exit code.
    """
    from .dist import env_rank
    env = env_rank()
    if env is not None:  # under torchrun: this process is one replica (torchrun forwards SIGTERM)
        with _sigterm(_stop_here):
            body(backend, *env, *args)
        return
    if backend == "xla":
        _spawn_xla(body, args, cores)
        return
    if backend == "torchtpu":
        _spawn_torchtpu(cores, body, args)
        return
    if cores == 1:
        with _sigterm(_stop_here):
            body(backend, 0, 1, 0, *args)
        return
    _spawn_dist(backend, cores, body, args)


# ----------------------------------------------------------------------------- XLA

def _spawn_xla(body: Body, args: tuple, cores: int) -> None:
    """xmp.spawn, with stop reports, a grace period and a kill for replicas left hanging."""
    from . import rehearsal
    from .xla import spawn
    from .xla import correct_spawn_environment
    xla_cpu = cores > 1 and os.environ.get("PJRT_DEVICE", "").upper() == "CPU"
    # XLA:CPU aborts the whole process 10 s after a collective that some replica never joins:
    # there, end the job soon after the first report (agreed stops report within milliseconds).
    grace = REHEARSAL_GRACE_S if xla_cpu else REPLICA_GRACE_S
    correct_spawn_environment()  # Kaggle's TPU_PROCESS_ADDRESSES=local
    with tempfile.TemporaryDirectory(prefix="moco_xla_") as reports, \
            rehearsal.environment(cores) if xla_cpu else contextlib.nullcontext(), \
            _sigterm(_stop_here if cores == 1 else _forward_to_replicas), _Watchdog(reports, grace) as dog:
        try:
            spawn(_xla_replica, (body, args, reports), nprocs=None if cores > 1 else 1)
        except RunStopped:
            raise  # one replica in this process (nprocs 1): it raised here directly
        except Exception as e:  # noqa: BLE001 - a replica process died (BrokenProcessPool) or raised
            raise _failure(reports, dog.exit_codes(), e) from None
        found = _read_reports(reports)
        if found:  # every replica stopped for the same reason, at the same step
            raise _report_error(found)


def _xla_replica(index: int, body: Body, args: tuple, reports: str) -> None:
    """One XLA replica (a thread or a process of xmp.spawn). XlaRuntime reads rank and world from PJRT."""
    try:
        body("xla", 0, 1, index, *args)
    except RunStopped as e:
        if _single_replica():
            raise
        _write_report(reports, _global_rank(), e)
    except Exception as e:
        if _single_replica():
            raise
        traceback.print_exc()
        _write_report(reports, _global_rank(), ReplicaCrashed(f"{type(e).__name__}: {e}"))
        raise


def _single_replica() -> bool:
    import torch_xla.runtime as xr
    return xr.world_size() == 1


def _global_rank() -> int:
    import torch_xla.runtime as xr
    return xr.global_ordinal()


class _Watchdog:
    """In the parent of xmp.spawn: once a replica reported, kill the job if it has not ended
    within ``grace`` seconds (the other replicas wait forever in their next collective)."""

    def __init__(self, reports: str, grace: float) -> None:
        self.reports, self.grace, self.done = reports, grace, threading.Event()
        self.children: dict[int, multiprocessing.Process] = {}
        self.thread = threading.Thread(target=self._watch, daemon=True, name="moco_xla-watchdog")

    def __enter__(self) -> _Watchdog:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        self.thread.join(timeout=5)

    def _watch(self) -> None:
        first_report: float | None = None
        while not self.done.wait(0.2):
            for child in multiprocessing.active_children():
                self.children.setdefault(child.pid, child)
            if first_report is None and any(Path(self.reports).glob("*.json")):
                first_report = time.monotonic()
            if first_report is not None and time.monotonic() - first_report > self.grace:
                for child in self.children.values():
                    if child.is_alive():
                        child.kill()
                return

    def exit_codes(self) -> list[int]:
        codes = []
        for child in self.children.values():
            child.join(timeout=5)
            if child.exitcode:
                codes.append(child.exitcode)
        return codes


# ----------------------------------------------------------------------------- torch.distributed

def _spawn_torchtpu(cores: int, body: Body, args: tuple) -> None:
    """TorchTPU: its launch environment first (one chip per process; every host of a pod slice
    runs the same launch), then one process per chip as for gloo and NCCL."""
    from .torchtpu import launch_plan, set_launch_env
    plan = launch_plan(cores)
    set_launch_env(plan)
    _spawn_dist("torchtpu", cores, body, args, world=plan.world_size, first_rank=plan.first_rank)


def _spawn_dist(backend: str, cores: int, body: Body, args: tuple,
                world: int | None = None, first_rank: int = 0) -> None:
    """``cores`` processes on this host, ranks ``first_rank``.. of a job of ``world`` (default: cores)."""
    import torch.multiprocessing as mp
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    world = world or cores
    with _sigterm(_forward_to_replicas), tempfile.TemporaryDirectory(prefix="moco_xla_") as reports:
        ctx = mp.spawn(_dist_replica, args=(backend, world, body, args, reports, first_rank), nprocs=cores,
                       join=False)
        try:
            while not ctx.join(grace_period=REPLICA_GRACE_S):
                pass
        except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:
            if not _read_reports(reports) and isinstance(e, mp.ProcessRaisedException):
                raise  # a replica crashed with a traceback: a bug, shown as such
            code = getattr(e, "exit_code", 1)
            raise _failure(reports, [code] if isinstance(code, int) else [], e,
                           getattr(e, "error_index", "?")) from None


def _dist_replica(local_rank: int, backend: str, world: int, body: Body, args: tuple, reports: str,
                  first_rank: int = 0) -> None:
    install_stop_handler()
    if backend == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # replicas share this host's cores
    rank = first_rank + local_rank
    try:
        body(backend, rank, world, local_rank, *args)
    except RunStopped as e:
        report_stop(reports, rank, e)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- reports

def _write_report(reports: str, rank: int, e: RunStopped) -> None:
    report = {"rank": rank, "code": e.exit_code, "kind": type(e).__name__, "message": str(e)}
    path = Path(reports, f"{rank}.json")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, path)  # the parent never reads half a report


def report_stop(reports: str, rank: int, e: RunStopped) -> NoReturn:
    """Tell the parent why this replica stops, then exit with the error's code."""
    _write_report(reports, rank, e)
    sys.exit(e.exit_code)


def _read_reports(reports: str) -> list[dict[str, Any]]:
    return [json.loads(f.read_text()) for f in sorted(Path(reports).glob("*.json"))]


_KINDS: dict[str, type[RunStopped]] = {"UserError": UserError, "NonFiniteLoss": NonFiniteLoss,
                                       "Preempted": Preempted, "ReplicaCrashed": ReplicaCrashed}


def _report_error(found: list[dict[str, Any]]) -> RunStopped:
    """The lowest rank's report: replicas agree on why they stop, and rank 0 speaks for them."""
    first = min(found, key=lambda r: r["rank"])
    err = _KINDS.get(first["kind"], RunStopped)(first["message"])
    err.exit_code = first["code"]
    return err


def _failure(reports: str, exit_codes: list[int], e: BaseException, who: Any = "?") -> RunStopped:
    """Why the job ended: a replica's report, else how a replica process died."""
    found = _read_reports(reports)
    if found:
        return _report_error(found)
    code = next((c for c in exit_codes if c), 1)
    code = 128 - code if code < 0 else code  # the shell's convention for a signal
    how = f"was killed by {_signal_name(code - 128)}" if code > 128 else f"exited with code {code}"
    err = RunStopped(f"replica {who} {how} ({type(e).__name__}); rerun with --resume auto "
                     f"to continue from the last checkpoint")
    err.exit_code = code
    return err


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# ----------------------------------------------------------------------------- SIGTERM

@contextlib.contextmanager
def _sigterm(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Install a SIGTERM handler for the duration (main thread only), then restore the previous one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _STOP.clear()


def _stop_here(signum: int, frame: Any) -> None:
    _STOP.set()


def _forward_to_replicas(signum: int, frame: Any) -> None:
    """In the parent of spawned replicas: pass SIGTERM on; they checkpoint and exit 75."""
    _STOP.set()
    for child in multiprocessing.active_children():
        try:
            os.kill(child.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


if multiprocessing.parent_process() is not None or getattr(multiprocessing.current_process(), "_inheriting", False):
    # A spawned replica process (mp.spawn, or xmp.spawn's process pool): its main thread imports
    # this module while it is being set up or when the replica function arrives. Replicas that
    # are threads (TPU v2/v3, XLA:CPU) cannot install signal handlers themselves.
    install_stop_handler()
