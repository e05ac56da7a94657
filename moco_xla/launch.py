"""``python -m moco_xla.launch``: pick a backend, start the replicas, train MoCo.

    python -m moco_xla.launch                                # every device of a TPU VM (v3-8: 8, v4-8: 4)
    PJRT_DEVICE=CPU python -m moco_xla.launch --backend xla --cores 4   # rehearse on 4 XLA:CPU replicas
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
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .config import Config, load_config, save_config, validate_world
from .errors import Preempted, RunStopped, UserError
from .profiling import GRAPH_CHECK_ENV, GRAPH_CHECKS, PROFILE_ENV, graph_check_mode
from .runtime import BACKENDS, available_replicas, hosts, make_runtime, replicas, resolve_backend, xla_installed


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
    p.add_argument("--check", action="store_true",
                   help="preflight: check versions, devices, batch, data, checkpoints and (XLA) compile one "
                        "step, without training; nonzero exit when a check fails")
    return p.parse_args(argv)


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


def check_hosts(cfg: Config, n_hosts: int, out: Path) -> None:
    """Several hosts must share their checkpoints: a local directory on each would let host 0
    resume while the others start over (and then hang in the first collective)."""
    if n_hosts > 1 and not str(cfg.checkpoint.dir or "").startswith("gs://"):
        where = cfg.checkpoint.dir or out / "checkpoints"
        raise UserError(f"checkpoint.dir={where} is local, but this job runs on {n_hosts} hosts; set "
                        f"--set checkpoint.dir=gs://BUCKET/PATH so that every host writes and resumes "
                        f"the same checkpoints")


def default_out(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_replica(backend: str, rank: int, world: int, local_rank: int, cfg: Config, out: str,
                resume: str | None = None) -> dict:
    """The body of every replica: make the runtime, train (until done or SIGTERM), shut down."""
    from .train import train
    rt = make_runtime(backend, rank, world, local_rank)
    try:
        return train(cfg, rt, out, resume, replicas.stop_requested)
    finally:
        rt.shutdown()


def start(backend: str, cores: int, cfg: Config, out: str, resume: str | None = None) -> None:
    """Train on ``cores`` replicas of ``backend`` (see runtime/replicas.py for how they start and stop).

    Raises RunStopped (UserError, NonFiniteLoss, Preempted) with the replicas' exit code.
    """
    from .runtime.xla import compile_cache_environment
    with compile_cache_environment(out) if backend == "xla" else contextlib.nullcontext():
        replicas.start(backend, cores, run_replica, (cfg, out, resume))


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
        if args.check:
            from .preflight import run as preflight
            return preflight(args, cfg, backend)
        from .runtime.dist import env_rank
        env = env_rank()
        if env is not None:
            if backend == "xla":
                raise UserError("torchrun drives the cpu/cuda backends; on TPUs use --cores (xmp.spawn)")
            if args.cores is not None and args.cores != env[1]:
                raise UserError(f"--cores {args.cores} disagrees with torchrun's WORLD_SIZE={env[1]}")
            world = cores = env[1]
        else:
            cores = replica_count(backend, args.cores)
            world = world_size(backend, cores)
        validate_world(cfg, world)
        check_backend(cfg, backend)
        set_diagnostics(args.profile, args.graph_check)
        check_data(cfg)
        out = Path(args.out) if args.out else default_out(cfg)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; pass a directory")
        check_hosts(cfg, world // cores, out)
        resume = plan_resume(cfg, args.resume, out, out_given=args.out is not None)
        if env is None or env[0] == 0:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
        print(f"moco_xla: {cfg.name} on {backend} x{world} -> {out}", flush=True)
        start(backend, cores, cfg, str(out), resume)
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

if __name__ == "__main__":
    sys.exit(main())
