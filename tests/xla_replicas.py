"""Run test code on N real XLA:CPU replicas (the TPU rehearsal), in a fresh child process.

``run_replicas(fn, n, *args)`` starts ``fn(rt, *args)`` on n XLA replicas through the same
path a launch takes (runtime.replicas.start -> xmp.spawn -> threads sharing one PJRT CPU
client with in-process collectives) and returns each rank's result, which ``fn`` must make
of CPU tensors and plain values. The child process keeps torch_xla's state out of pytest's.
"""
from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def xla_env(n: int) -> dict[str, str]:
    """The environment of an n-replica XLA:CPU run (launch sets the rest itself)."""
    return {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(n), "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def run_replicas(fn: Callable[..., Any], n: int, *args: Any, timeout: int = 300) -> list[Any]:
    with tempfile.TemporaryDirectory() as d:
        job = Path(d) / "job.pkl"
        job.write_bytes(pickle.dumps((fn.__module__, fn.__qualname__, args, n)))
        p = subprocess.run([sys.executable, "-m", "xla_replicas", str(job), d], cwd=ROOT, env=xla_env(n),
                           capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])
        return [torch.load(Path(d) / f"{r}.pt", weights_only=False) for r in range(n)]


def _body(backend: str, rank: int, world: int, local_rank: int, module: str, name: str, args: tuple,
          out: str) -> None:
    from moco_xla.runtime import make_runtime
    rt = make_runtime(backend, rank, world, local_rank)
    fn = getattr(importlib.import_module(module), name)
    result = fn(rt, *args)
    torch.save(result, Path(out) / f"{rt.rank}.pt")


def _main(job: str, out: str) -> None:
    from moco_xla.runtime import replicas
    from xla_replicas import _body as body  # by module name: picklable for the replica process
    module, name, args, n = pickle.loads(Path(job).read_bytes())
    replicas.start("xla", n, body, (module, name, args, out))


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
