"""Shared test helpers: real gloo process groups on this machine, tiny configs."""
from __future__ import annotations

import importlib.util
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PJRT_DEVICE", "CPU")  # tests never look for a TPU


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_entry(rank: int, world: int, port: int, out_dir: str, fn: Callable, args: tuple,
                make: Callable | None = None) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    from moco_xla.runtime import make_runtime
    rt = make(rank, world) if make is not None else make_runtime("cpu", rank, world, rank)
    try:
        result = fn(rt, *args)
        torch.save(result, Path(out_dir) / f"{rank}.pt")
    finally:
        rt.shutdown()


def run_gloo(fn: Callable, world: int, *args: Any, make: Callable | None = None) -> list[Any]:
    """Run ``fn(rt, *args)`` in ``world`` real gloo processes; return each rank's result.

    ``make(rank, world)`` builds each replica's Runtime (default: the cpu backend's)."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_gloo_entry, args=(world, _free_port(), d, fn, args, make), nprocs=world, join=True)
        return [torch.load(Path(d) / f"{r}.pt", weights_only=False) for r in range(world)]


XLA_INSTALLED = importlib.util.find_spec("torch_xla") is not None
NEEDS_XLA = "needs torch_xla (not installed in this environment)"


# The test files that take longest (--durations=0 summed per file, longest first). They run first, so
# that the two xdist workers (pyproject.toml: each file on one worker, in collection order) finish
# together instead of one of them starting a long file when the other has nothing left.
LONGEST_FIRST = ("test_eval.py", "test_xla_launch.py", "test_preempt.py", "test_launch.py", "test_resume.py",
                 "test_compile_cache.py", "test_xla_replicas.py", "test_overlap.py", "test_shuffle_bn.py",
                 "test_distill.py", "test_preflight.py", "test_mocov3_xla.py", "test_rehearsal_align.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest test files first (LONGEST_FIRST); tests marked ``needs_xla`` (XLA:CPU replicas,
    lowering, the xla backend) skip, with that reason, where torch_xla is not installed: the CI
    environment with a current torch runs the rest."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    if XLA_INSTALLED:
        return
    for item in items:
        if "needs_xla" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=NEEDS_XLA))


@pytest.fixture
def tiny_cfg():
    from moco_xla.config import load_config
    return load_config("tiny")
