"""``python -m moco_xla.launch``: pick a backend, start the replicas, train MoCo.

    python -m moco_xla.launch --cores 8                      # all cores of a TPU VM
    python -m moco_xla.launch --backend cpu --cores 2 --config digits
    torchrun --nproc_per_node 4 -m moco_xla.launch --backend cuda --config cifar10

One replica per TPU core (xmp.spawn), per GPU (torch.multiprocessing + NCCL) or
per CPU process (gloo). Under torchrun (RANK/WORLD_SIZE set) this process *is*
one replica. On a TPU pod slice, run the same command on every worker
(``gcloud ... ssh --worker=all``): torch_xla's multi-host PJRT runtime joins them.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from .config import Config, load_config, save_config, validate_world
from .errors import UserError
from .runtime import BACKENDS, available_replicas, make_runtime, resolve_backend, xla_installed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moco_xla.launch", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cores", type=int, default=None,
                   help="replicas: TPU cores (all or 1), GPUs, or CPU processes (default: all devices; CPU 1)")
    p.add_argument("--config", default=None, help="config name in configs/ or a YAML path (default: digits)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="auto: TPU, then CUDA, then CPU")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=0.03 (repeatable)")
    p.add_argument("--out", default=None, help="output directory (default: runs/<config>-<time>)")
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


def run_replica(backend: str, rank: int, world: int, local_rank: int, cfg: Config, out: str) -> dict:
    """The body of every replica: make the runtime, train, shut down."""
    from .train import train
    rt = make_runtime(backend, rank, world, local_rank)
    try:
        return train(cfg, rt, out)
    finally:
        rt.shutdown()


def _xla_replica(index: int, cfg: Config, out: str) -> None:
    run_replica("xla", 0, 1, index, cfg, out)  # XlaRuntime reads rank and world from PJRT


def _dist_replica(rank: int, backend: str, world: int, cfg: Config, out: str) -> None:
    run_replica(backend, rank, world, rank, cfg, out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(backend: str, cores: int, cfg: Config, out: str) -> None:
    """Start ``cores`` replicas of ``backend`` on this host and wait for them."""
    from .runtime.dist import env_rank
    env = env_rank()
    if env is not None:  # under torchrun: this process is one replica
        rank, world, local_rank = env
        run_replica(backend, rank, world, local_rank, cfg, out)
        return
    if backend == "xla":
        from .runtime.xla import spawn
        spawn(_xla_replica, (cfg, out), nprocs=None if cores > 1 else 1)
        return
    if cores == 1:
        run_replica(backend, 0, 1, 0, cfg, out)
        return
    import torch.multiprocessing as mp
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    mp.spawn(_dist_replica, args=(backend, cores, cfg, out), nprocs=cores, join=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
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
        out = Path(args.out) if args.out else default_out(cfg)
        if env is None or env[0] == 0:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
        print(f"moco_xla: {cfg.name} on {backend} x{world} -> {out}", flush=True)
        start(backend, world, cfg, str(out))
    except UserError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if env is None or env[0] == 0:
        print_summary(out)
    return 0


def print_summary(out: Path) -> None:
    import json
    path = out / "summary.json"
    if not path.exists():
        return
    s: dict[str, Any] = json.loads(path.read_text())
    rows = [("kNN top-1 (%)", s.get("knn_top1")), ("final loss", s.get("final_loss")),
            ("epochs", s.get("epochs")), ("steps", s.get("steps")), ("images/s", s.get("images_per_s")),
            ("wall (s)", s.get("wall_s")), ("replicas", s.get("world_size")), ("backend", s.get("backend"))]
    print("\n".join(f"  {k:<14} {v:.2f}" if isinstance(v, float) else f"  {k:<14} {v}" for k, v in rows))
    print(f"  results in {out}")


if __name__ == "__main__":
    sys.exit(main())
