"""``python -m moco_xla.launch --backend xla --cores 4`` on 4 real XLA:CPU replicas, as a user
rehearses an 8-core TPU run: training with 0 recompilations, exact resume, SIGTERM, bad data."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_fixtures import write_image_folder
from reliability_fns import assert_same_training_state, final_checkpoint, step_records, wait_for_steps
from xla_replicas import ROOT, xla_env

from moco_xla.checkpoint import latest_checkpoint, load_checkpoint
from moco_xla.errors import EXIT_PREEMPTED

pytestmark = pytest.mark.needs_xla  # XLA:CPU replicas: skipped where torch_xla is not installed

LAUNCH = [sys.executable, "-m", "moco_xla.launch", "--backend", "xla", "--cores", "4"]
TINY = ["--config", "tiny", "--set", "train.precision=fp32", "--set", "eval.knn_every=0",
        "--set", "checkpoint.keep=10"]


def launch(args: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    env = xla_env(4)
    del env["CPU_NUM_DEVICES"]  # --cores 4 sets it, as for a user who only passes --cores
    return subprocess.run(LAUNCH + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_four_replicas_train_without_recompiling_and_resume_exactly(tmp_path):
    """With moco.m_cosine, train.average_from and moco.nn_weight as well: a key momentum that changes
    every step, the weight average's update at every epoch's end and a second positive drawn from
    the queue, its share warmed up step by step to 1, compile no new graph, and resume exactly."""
    a, b = tmp_path / "a", tmp_path / "b"
    tiny = TINY + ["--set", "moco.m_cosine=true", "--set", "train.average_from=1", "--set", "eval.knn_encoder=averaged",
                   "--set", "moco.nn_weight=1", "--set", "moco.nn_warmup_epochs=1"]
    p = launch(tiny + ["--out", str(a)])
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((a / "summary.json").read_text())
    assert s["world_size"] == 4 and s["backend"] == "xla" and s["precision"] == "fp32"
    assert s["steps"] == 6 and 0 <= s["knn_top1"] <= 100
    graph = s["xla_graph"]
    assert graph["compiles_after_warmup"] == 0 and graph["fallback_ops"] == 0, graph
    first = sorted((a / "checkpoints").glob("ckpt-*.pt"))[0]
    assert load_checkpoint(str(first))["global_step"] == 3 and len(load_checkpoint(str(first))["rng"]) == 4
    # continue from the end of epoch 1 in another directory: bit-identical to the straight run
    p = launch(tiny + ["--out", str(b), "--resume", str(first)])
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_training_state(final_checkpoint(a), final_checkpoint(b))
    assert int(final_checkpoint(a)["model"]["encoder_avg.n_averaged"]) == 2  # the ends of epochs 1 and 2


def test_precise_bn_knn_compiles_once_and_reads_no_host_value(tmp_path):
    """eval.knn_bn=recompute on 4 replicas: the second kNN monitor compiles no graph the first did
    not (the statistics pass is one fixed shape, momentum a constant), and nothing after warm-up."""
    out = tmp_path / "run"
    p = launch(TINY + ["--set", "eval.knn_every=1", "--set", "eval.knn_bn=recompute", "--out", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    graph = s["xla_graph"]
    assert graph["compiles_after_warmup"] == 0 and graph["fallback_ops"] == 0, graph
    first, second = graph["region_compiles"]["knn"][:2]
    assert first > 0 and second == 0, graph["region_compiles"]
    knn = [r["knn_top1"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
           if r.get("type") == "epoch" and "knn_top1" in r]
    assert len(knn) == 2 and all(0 <= k <= 100 for k in knn)


def test_sigterm_stops_every_replica_at_one_step_with_a_checkpoint(tmp_path):
    out, log = tmp_path / "run", tmp_path / "log"
    args = TINY + ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=30",
                   "--set", "train.stop_every=2", "--out", str(out)]
    env = xla_env(4)
    with open(log, "w") as f:
        proc = subprocess.Popen(LAUNCH + args, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    wait_for_steps(proc, out, 2, timeout=300)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, log.read_text()[-3000:]
    text = log.read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("preempted: ")]
    assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
    ck = load_checkpoint(latest_checkpoint(out))
    assert 2 <= ck["global_step"] < 30 and f"after global step {ck['global_step']} " in lines[0]
    assert len(ck["rng"]) == 4  # every replica joined the checkpoint's gather at that step
    assert len(step_records(out)) == ck["global_step"]  # nothing logged past the agreed step


def test_bad_sample_on_one_replica_ends_the_job_with_one_line(tmp_path):
    from moco_xla import data
    from moco_xla.config import load_config
    root = write_image_folder(tmp_path / "folder", classes=2, per_class=20, size=16, fmt="png")
    sets = ["data.dataset=folder", f"data.root={root}", "data.test_fraction=0.2", "train.batch_size=16",
            "train.epochs=1"]
    cfg = load_config("tiny", sets)
    train_paths = [path for path, _ in data.build(cfg).pretrain.base.samples]
    assert len(train_paths) == 32  # 2 steps of 16: every image is read once, by one replica
    Path(train_paths[5]).write_bytes(b"not an image")
    started = time.time()
    p = launch(["--config", "tiny", "--set", "train.precision=fp32", "--out", str(tmp_path / "run")]
               + [a for s in sets for a in ("--set", s)], timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    # (the progress bar of the stopped epoch may stand before it on the same terminal line)
    errors = [ln[ln.index("error: "):] for ln in p.stderr.splitlines() if "error: " in ln]
    assert len(errors) == 1 and train_paths[5] in errors[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert time.time() - started < 240  # ended, never a hang
