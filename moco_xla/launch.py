"""``python -m moco_xla.launch``: pick a backend, start the replicas, train MoCo.

    python -m moco_xla.launch --cores 8                      # all cores of a TPU VM
    python -m moco_xla.launch --backend cpu --cores 2 --config digits
    torchrun --nproc_per_node 4 -m moco_xla.launch --backend cuda --config cifar10

One replica per TPU core (xmp.spawn), per GPU (torch.multiprocessing + NCCL) or
per CPU process (gloo). Under torchrun (RANK/WORLD_SIZE set) this process *is*
one replica. On a TPU pod slice, run the same command on every worker
(``gcloud ... ssh --worker=all``): torch_xla's multi-host PJRT runtime joins them.

Reliability: ``--resume auto`` continues from the newest checkpoint, so rerunning the same
command after a crash or preemption picks up where the run stopped. SIGTERM (spot/preemptible
VMs, Kubernetes) makes every replica stop at the same step, write a checkpoint and exit 75.
Exit codes: 0 done, 2 bad input, 3 NaN/inf loss, 75 preempted (see errors.py).
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
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
from typing import Any, Iterator, NoReturn

from . import checkpoint as ckpt
from .config import Config, load_config, save_config, validate_world
from .errors import NonFiniteLoss, Preempted, RunStopped, UserError
from .profiling import GRAPH_CHECK_ENV, GRAPH_CHECKS, PROFILE_ENV, graph_check_mode
from .runtime import BACKENDS, available_replicas, make_runtime, resolve_backend, xla_installed

# Set by SIGTERM in this process. A process-wide flag on purpose: signals reach processes,
# and on TPU v2/v3 several replica threads of one process share it.
_STOP = threading.Event()
REPLICA_GRACE_S = 120  # a stopping replica waits this long for the others before they are killed


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (and a did-you-mean for mistyped flags)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments:"):
            flags = [o for a in self._actions for o in a.option_strings]
            for word in message.split(":", 1)[1].split():
                guess = difflib.get_close_matches(word.split("=")[0], flags, n=1)
                if word.startswith("-") and guess:
                    message += f"; did you mean {guess[0]}?"
                    break
        raise UserError(f"{message} (see python -m moco_xla.launch --help)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog="python -m moco_xla.launch", description=__doc__.split("\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cores", type=int, default=None,
                   help="replicas: TPU cores (all or 1), GPUs, or CPU processes (default: all devices; CPU 1)")
    p.add_argument("--config", default=None, help="config name in configs/ or a YAML path (default: digits)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="auto: TPU, then CUDA, then CPU")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=0.03 (repeatable)")
    p.add_argument("--out", default=None, help="output directory (default: runs/<config>-<time>)")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="auto: continue from the newest checkpoint in --out (or checkpoint.dir) if "
                        "there is one; PATH: a ckpt-*.pt file or a directory holding checkpoints")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="trace training steps 3-7 into DIR/rank<N> (torch_xla profiler on XLA, "
                        "torch.profiler on CUDA/CPU); open with TensorBoard's profile tab")
    p.add_argument("--graph-check", default=None, choices=GRAPH_CHECKS,
                   help="XLA: after warm-up, a recompilation, an op falling back to the host or a "
                        "host read outside log steps warns (default), fails the run (error) or is ignored")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p.parse_args(argv)


def replica_count(backend: str, cores: int | None) -> int:
    """Validate ``--cores`` against what the backend can run on this host; UserError if not."""
    if cores is not None and cores < 1:
        raise UserError(f"--cores must be >= 1, got {cores}")
    if backend == "xla":
        if not xla_installed():
            raise UserError("--backend xla needs torch_xla (pip install torch_xla); valid here: cuda, cpu")
        have = available_replicas("xla")
        if have == 0:
            raise UserError("--backend xla found no TPU; set PJRT_DEVICE=CPU for XLA:CPU (1 core) "
                            "or use --backend cpu")
        cores = have if cores is None else cores
        if cores not in (1, have):
            raise UserError(f"--cores {cores} is not available on XLA: PJRT exposes {have} device(s); "
                            f"use --cores {have} or --cores 1")
        return cores
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


def default_out(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_replica(backend: str, rank: int, world: int, local_rank: int, cfg: Config, out: str,
                resume: str | None = None) -> dict:
    """The body of every replica: make the runtime, train (until done or SIGTERM), shut down."""
    from .train import train
    rt = make_runtime(backend, rank, world, local_rank)
    try:
        return train(cfg, rt, out, resume, _STOP.is_set)
    finally:
        rt.shutdown()


def install_stop_handler() -> None:
    """SIGTERM asks this process's replicas to stop at the next agreed step (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: _STOP.set())


def _xla_replica(index: int, cfg: Config, out: str, resume: str | None) -> None:
    run_replica("xla", 0, 1, index, cfg, out, resume)  # XlaRuntime reads rank and world from PJRT


def _dist_replica(rank: int, backend: str, world: int, cfg: Config, out: str, resume: str | None,
                  reports: str) -> None:
    install_stop_handler()
    try:
        run_replica(backend, rank, world, rank, cfg, out, resume)
    except RunStopped as e:
        report_stop(reports, rank, e)


def report_stop(reports: str, rank: int, e: RunStopped) -> NoReturn:
    """Tell the parent why this replica stops (a file: no lock a killed peer could leak), then exit."""
    report = {"rank": rank, "code": e.exit_code, "kind": type(e).__name__, "message": str(e)}
    Path(reports, f"{rank}.json").write_text(json.dumps(report))
    sys.exit(e.exit_code)


def replica_failure(e: Exception, reports: str) -> RunStopped | None:
    """Why spawned replicas stopped: the lowest rank's report, else how a replica died.

    None for a replica that raised an exception of its own: a bug, to be shown with its traceback.
    """
    import torch.multiprocessing as mp
    found = [json.loads(f.read_text()) for f in sorted(Path(reports).glob("*.json"))]
    if found or isinstance(e, mp.ProcessExitedException):
        return _replica_error(e, found)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _sigterm(handler) -> Iterator[None]:
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


def start(backend: str, cores: int, cfg: Config, out: str, resume: str | None = None) -> None:
    """Start ``cores`` replicas of ``backend`` on this host and wait for them.

    Raises RunStopped (UserError, NonFiniteLoss, Preempted) with the replicas' exit code.
    """
    from .runtime.dist import env_rank
    env = env_rank()
    if env is not None:  # under torchrun: this process is one replica (torchrun forwards SIGTERM)
        rank, world, local_rank = env
        with _sigterm(_stop_here):
            run_replica(backend, rank, world, local_rank, cfg, out, resume)
        return
    if backend == "xla":
        from .runtime.xla import spawn
        with _sigterm(_stop_here if cores == 1 else _forward_to_replicas):
            spawn(_xla_replica, (cfg, out, resume), nprocs=None if cores > 1 else 1)
        return
    if cores == 1:
        with _sigterm(_stop_here):
            run_replica(backend, 0, 1, 0, cfg, out, resume)
        return
    _spawn_dist(backend, cores, cfg, out, resume)


def _spawn_dist(backend: str, cores: int, cfg: Config, out: str, resume: str | None) -> None:
    import torch.multiprocessing as mp
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    with _sigterm(_forward_to_replicas), tempfile.TemporaryDirectory(prefix="moco_xla_") as reports:
        ctx = mp.spawn(_dist_replica, args=(backend, cores, cfg, out, resume, reports), nprocs=cores,
                       join=False)
        try:
            while not ctx.join(grace_period=REPLICA_GRACE_S):
                pass
        except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:
            err = replica_failure(e, reports)
            if err is None:
                raise  # a replica crashed with a traceback: a bug, shown as such
            raise err from None


def _replica_error(e: Exception, reports: list[dict[str, Any]]) -> RunStopped:
    """The lowest rank's report (replicas agree on why they stop), else how the replica died."""
    if reports:
        first = min(reports, key=lambda r: r["rank"])
        code = first["code"]
        err = {"UserError": UserError, "NonFiniteLoss": NonFiniteLoss, "Preempted": Preempted}.get(
            first["kind"], RunStopped)(first["message"])
    else:
        code = getattr(e, "exit_code", 1)
        signal_name = getattr(e, "signal_name", None)
        code = 128 - code if code < 0 else code  # the shell's convention for a signal
        how = f"was killed by {signal_name}" if signal_name else f"exited with code {code}"
        err = RunStopped(f"replica {getattr(e, 'error_index', '?')} {how}; rerun with --resume auto "
                         f"to continue from the last checkpoint")
    err.exit_code = code
    return err


def set_diagnostics(profile: str | None, graph_check: str | None) -> None:
    """--profile / --graph-check reach every replica (threads and processes) through the environment."""
    if profile is not None:
        if not profile.strip() or "://" in profile:
            raise UserError(f"--profile {profile!r} must be a local directory")
        os.environ[PROFILE_ENV] = str(Path(profile).resolve())
    if graph_check is not None:
        os.environ[GRAPH_CHECK_ENV] = graph_check
    graph_check_mode()  # UserError for a bad $MOCO_XLA_GRAPH_CHECK, before any replica starts


def check_backend(cfg: Config, backend: str) -> None:
    """Config values that only some backends support."""
    if backend == "xla" and cfg.train.precision == "fp16":
        raise UserError("train.precision=fp16 is not supported on XLA; valid there: auto, bf16, fp32")
    if backend == "cpu" and cfg.train.precision == "fp16":
        raise UserError("train.precision=fp16 needs --backend cuda; valid on cpu: auto, bf16, fp32")


def plan_resume(cfg: Config, arg: str | None, out: Path, out_given: bool = True) -> str | None:
    """Validate the checkpoint directory and ``--resume``; the checkpoint to start from, or None."""
    if arg is not None and not arg.strip():
        raise UserError("--resume needs a value: auto or a checkpoint path")
    if arg == "auto" and not out_given and not cfg.checkpoint.dir:
        raise UserError("--resume auto needs --out (or checkpoint.dir) naming the run to continue; "
                        "the default --out is a new directory every time")
    directory = ckpt.checkpoint_dir(cfg, out)
    ckpt.check_storage(directory)
    if arg is None:
        existing = ckpt.latest_checkpoint(directory)
        if existing:
            raise UserError(f"{directory} already holds checkpoints (newest {existing}); pass "
                            f"--resume auto to continue that run, or choose another --out")
        return None
    path = ckpt.resolve_resume(arg, directory)
    if path is None:
        if arg == "auto":
            print(f"moco_xla: no checkpoint in {directory} yet; starting from scratch", flush=True)
        return None
    meta = ckpt.checkpoint_meta(path)
    if not isinstance(meta.get("config"), dict):
        raise UserError(f"{path} is not a moco_xla checkpoint (no config in it)")
    changed = ckpt.check_compatible(meta["config"], cfg, path)
    note = f"; changed since: {', '.join(changed)}" if changed else ""
    print(f"moco_xla: resuming {path} (epoch {meta.get('epoch', 0) + 1}, step "
          f"{meta.get('step_in_epoch')}){note}", flush=True)
    return path


def check_data(cfg: Config) -> None:
    """The data section (names, roots, buckets), before any replica starts."""
    from . import data
    check = getattr(data, "check", None)
    if check is not None:
        check(cfg)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = parse_args(argv)
        cfg = load_config(args.config, args.overrides)
        backend = resolve_backend(args.backend)
        from .runtime.dist import env_rank
        env = env_rank()
        if env is not None:
            if backend == "xla":
                raise UserError("torchrun drives the cpu/cuda backends; on TPUs use --cores (xmp.spawn)")
            if args.cores is not None and args.cores != env[1]:
                raise UserError(f"--cores {args.cores} disagrees with torchrun's WORLD_SIZE={env[1]}")
            world = env[1]
        else:
            world = replica_count(backend, args.cores)
        validate_world(cfg, world)
        check_backend(cfg, backend)
        set_diagnostics(args.profile, args.graph_check)
        check_data(cfg)
        out = Path(args.out) if args.out else default_out(cfg)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; pass a directory")
        resume = plan_resume(cfg, args.resume, out, out_given=args.out is not None)
        if env is None or env[0] == 0:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
        print(f"moco_xla: {cfg.name} on {backend} x{world} -> {out}", flush=True)
        start(backend, world, cfg, str(out), resume)
    except RunStopped as e:
        if debug:
            traceback.print_exc()
        kind = "preempted" if isinstance(e, Preempted) else "error"
        print(f"{kind}: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    if env is None or env[0] == 0:
        print_summary(out)
    return 0


def print_summary(out: Path) -> None:
    path = out / "summary.json"
    if not path.exists():
        return
    s: dict[str, Any] = json.loads(path.read_text())
    rows = [("kNN top-1 (%)", s.get("knn_top1")), ("final loss", s.get("final_loss")),
            ("epochs", s.get("epochs")), ("steps", s.get("steps")), ("images/s", s.get("images_per_s")),
            ("wall (s)", s.get("wall_s")), ("replicas", s.get("world_size")), ("backend", s.get("backend"))]
    graph = s.get("xla_graph") or {}
    if graph:
        rows.append(("XLA graphs", f"{graph.get('compiles')} compiled, {graph.get('compiles_after_warmup')} after "
                                   f"warm-up, {graph.get('fallback_ops')} fallback ops"))
    print("\n".join(f"  {k:<14} {v:.2f}" if isinstance(v, float) else f"  {k:<14} {v}" for k, v in rows))
    print(f"  results in {out}")


if multiprocessing.parent_process() is not None:
    # A spawned replica process (xmp.spawn runs replicas in threads, which cannot install signal
    # handlers): this module is imported by its main thread when the replica function arrives.
    install_stop_handler()

if __name__ == "__main__":
    sys.exit(main())
