"""Helpers for the reliability tests: real launcher runs (subprocess or in-process), their checkpoints."""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moco_xla.checkpoint import latest_checkpoint, load_checkpoint
from moco_xla.launch import main
from moco_xla.report import read_metrics

ROOT = Path(__file__).resolve().parent.parent
# tiny: 3 steps per epoch, batch 32; kNN only after the last epoch.
TINY = ["--config", "tiny", "--set", "eval.knn_every=0", "--set", "checkpoint.keep=10"]
TWO = ["--backend", "cpu", "--cores", "2"]
LAUNCH = [sys.executable, "-m", "moco_xla.launch"]


def env() -> dict[str, str]:
    """One thread per process (2 cores, several replicas) and no TPU lookup."""
    return {**os.environ, "PJRT_DEVICE": "CPU", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cli(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m moco_xla.launch ARGS`` as a user runs it."""
    return subprocess.run(LAUNCH + args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def popen(args: list[str], log: Path) -> subprocess.Popen:
    """Start the launcher in the background; stdout and stderr go to ``log``."""
    f = open(log, "w")
    return subprocess.Popen(LAUNCH + args, cwd=ROOT, env=env(), stdout=f, stderr=subprocess.STDOUT, text=True)


def run_inprocess(args: list[str]) -> int:
    """``launch.main(ARGS)`` in this process (one replica): no interpreter start-up to pay."""
    torch.set_num_threads(1)
    return main(args)


def step_records(out: Path) -> list[dict]:
    """The run's step records so far (a line being written right now is skipped)."""
    return [r for r in read_metrics(out) if r.get("type") == "step"]


def wait_for_steps(proc: subprocess.Popen, out: Path, n: int, timeout: float = 240) -> int:
    """Block until the run logged ``n`` step records (or exited); returns how many it logged."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = len(step_records(out))
        if done >= n or proc.poll() is not None:
            return done
        time.sleep(0.02)
    raise TimeoutError(f"run in {out} logged fewer than {n} steps in {timeout} s")


def replica_pids(parent: int) -> list[int]:
    """The replica processes mp.spawn started under ``parent``, in rank order (they start in order)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in cmd:
            pids.append(int(d.name))
    return sorted(pids)


def final_checkpoint(out: Path) -> dict:
    path = latest_checkpoint(out)
    assert path is not None, f"no checkpoint in {out}"
    return load_checkpoint(path)


def assert_same_training_state(a: dict, b: dict) -> None:
    """Bit-identical encoders, queue and pointer, optimizer momentum, RNG states and position."""
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"model[{k}] differs"
    for i, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
    assert len(a["rng"]) == len(b["rng"]) and all(torch.equal(x, y) for x, y in zip(a["rng"], b["rng"]))


_CACHE: dict[tuple, Path] = {}
_CACHE_DIR = Path(tempfile.mkdtemp(prefix="moco_reliability_"))
atexit.register(shutil.rmtree, _CACHE_DIR, True)


def reference_run(args: tuple[str, ...], subprocess_run: bool = True) -> Path:
    """An uninterrupted run with ``args``, made once per test session and shared by the tests."""
    key = (args, subprocess_run)
    if key not in _CACHE:
        out = _CACHE_DIR / f"ref{len(_CACHE)}"
        full = list(args) + ["--out", str(out)]
        if subprocess_run:
            p = cli(full)
            assert p.returncode == 0, p.stderr[-3000:]
        else:
            assert run_inprocess(full) == 0
        _CACHE[key] = out
    return _CACHE[key]
