"""The launcher as a user runs it: CPU gloo replicas, torchrun, XLA:CPU, and wrong --cores."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

SUMMARY_KEYS = {"knn_top1", "epochs", "steps", "wall_s", "images_per_s", "world_size", "backend"}


def run(args: list[str], env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PJRT_DEVICE": "CPU", **(env_extra or {})}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def check_run(out: Path, world: int, backend: str) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["world_size"] == world and summary["backend"] == backend
    assert summary["steps"] == 2 * 3 and summary["epochs"] == 2
    assert 0 <= summary["knn_top1"] <= 100 and summary["images_per_s"] > 0
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert epochs[-1]["knn_top1"] == summary["knn_top1"]
    assert (out / "config.yaml").exists()
    return summary


def test_launch_two_cpu_replicas(tmp_path):
    out = tmp_path / "run"
    p = run([sys.executable, "-m", "moco_xla.launch", "--backend", "cpu", "--cores", "2",
             "--config", "tiny", "--out", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    check_run(out, 2, "cpu")
    assert "kNN top-1" in p.stdout


def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "run"
    torchrun = Path(sys.executable).parent / "torchrun"
    p = run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "moco_xla.launch",
             "--backend", "cpu", "--config", "tiny", "--out", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    check_run(out, 2, "cpu")


@pytest.mark.needs_xla
def test_xla_backend_one_replica(tmp_path):
    out = tmp_path / "run"
    p = run([sys.executable, "-m", "moco_xla.launch", "--backend", "xla", "--cores", "1",
             "--config", "tiny", "--out", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    summary = check_run(out, 1, "xla")
    assert summary["final_loss"] is not None and summary["final_loss"] > 0


@pytest.mark.needs_xla
def test_wrong_cores_is_a_one_line_error():
    p = run([sys.executable, "-m", "moco_xla.launch", "--backend", "xla", "--cores", "8", "--config", "tiny"],
            env_extra={"CPU_NUM_DEVICES": "2"})
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "CPU_NUM_DEVICES exposes 2 device(s)" in p.stderr


def test_cuda_without_gpu_is_a_one_line_error():
    p = run([sys.executable, "-m", "moco_xla.launch", "--backend", "cuda", "--cores", "2", "--config", "tiny"],
            env_extra={"CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 2 and "no CUDA GPU" in p.stderr
