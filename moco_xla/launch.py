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
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from . import cli, data
from .data import storage
from .config import Config, load_config, save_config, validate_world
from .errors import UserError
from .profiling import GRAPH_CHECK_ENV, GRAPH_CHECKS, PROFILE_ENV, graph_check_mode
from .runtime import BACKENDS, make_runtime, replicas, resolve_backend
from .runtime.plan import plan_replicas


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser("python -m moco_xla.launch", __doc__)
    p.add_argument("--cores", type=int, default=None,
                   help="replicas: TPU cores (all or 1), GPUs, or CPU processes (default: all devices; CPU 1)")
    p.add_argument("--config", default=None, help="config name (one of the packaged moco_xla/configs/) or a YAML path (default: digits)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="auto: TPU (torchtpu if torch_tpu is installed, else xla), then CUDA, then CPU")
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


def check_hosts(cfg: Config, n_hosts: int, out: Path) -> None:
    """Several hosts must share their checkpoints: a local directory on each would let host 0
    resume while the others start over (and then hang in the first collective)."""
    if n_hosts > 1 and not str(cfg.checkpoint.dir or "").startswith("gs://"):
        where = cfg.checkpoint.dir or out / "checkpoints"
        raise UserError(f"checkpoint.dir={where} is local, but this job runs on {n_hosts} hosts; set "
                        f"--set checkpoint.dir=gs://BUCKET/PATH so that every host writes and resumes "
                        f"the same checkpoints")


def default_out(cfg: Config) -> Path:
    return Path("runs") / cli.run_name(cfg.name)


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
    with _compile_cache(backend, out):
        replicas.start(backend, cores, run_replica, (cfg, out, resume))


def _compile_cache(backend: str, out: str) -> contextlib.AbstractContextManager:
    """XLA's persistent compilation cache for the replicas (runtime/xla.py); nothing elsewhere."""
    if backend != "xla":
        return contextlib.nullcontext()
    from .runtime.xla import compile_cache_environment
    return compile_cache_environment(out)


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
    if backend == "torchtpu" and cfg.train.precision == "fp16":
        raise UserError("train.precision=fp16 is not supported on TorchTPU; valid there: auto, bf16, fp32")
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
    storage.check_writable(directory)
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


def main(argv: list[str] | None = None) -> int:
    argv = cli.argv_or_sys(argv)
    return cli.run(lambda: launch(parse_args(argv)), argv)


def launch(args: argparse.Namespace) -> int:
    """Check everything a user can get wrong, then train; the summary when this process reports."""
    cfg = load_config(args.config, args.overrides)
    if args.check:
        from .preflight import run as preflight
        return preflight(args, cfg, resolve_backend(args.backend))
    plan = plan_replicas(args.backend, args.cores)
    validate_world(cfg, plan.world)
    check_backend(cfg, plan.backend)
    set_diagnostics(args.profile, args.graph_check)
    data.check(cfg)
    out = cli.out_dir(Path(args.out) if args.out else default_out(cfg))
    check_hosts(cfg, plan.hosts, out)
    resume = plan_resume(cfg, args.resume, out, out_given=args.out is not None)
    if plan.reports:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    print(f"moco_xla: {cfg.name} on {plan.backend} x{plan.world} -> {out}", flush=True)
    start(plan.backend, plan.cores, cfg, str(out), resume)
    if plan.reports:
        print_summary(out)
    return 0


def print_summary(out: Path) -> None:
    path = out / "summary.json"
    if not path.exists():
        return
    s: dict[str, Any] = json.loads(path.read_text())
    rows = [("kNN top-1 (%)", s.get("knn_top1")), ("pixel kNN (%)", s.get("pixel_knn_top1")),
            ("final loss", s.get("final_loss")),
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
