"""The offline digits quickstart learns, through the real CLI.

A shortened run of configs/digits.yaml (12 epochs, width 16, K 1024; measured: seed 0
kNN 95.0% against 66.3% for the same encoder randomly initialised, seed 1 92.8% against
58.7%; final loss 9.1 against the uniform-logits 13.9) must beat the random encoder by a
wide margin. Seed 1 runs here; the evaluation tests pre-train the same shortened config
at seed 0 and assert its probe beats a random encoder (tests/test_eval.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SHORT = ["train.epochs=12", "model.width=16", "moco.K=1024", "eval.knn_every=0", "checkpoint.every=0"]


def random_init_knn(overrides: list[str]) -> float:
    from moco_xla import data
    from moco_xla.config import load_config
    from moco_xla.knn import knn_accuracy
    from moco_xla.runtime import make_runtime
    from moco_xla.train import build_model
    cfg = load_config("digits", overrides)
    rt = make_runtime("local")
    bundle = data.build(cfg)
    model = build_model(cfg, rt)
    return float(knn_accuracy(rt, model.encoder_q.backbone, bundle.bank, bundle.test, bundle.num_classes,
                              cfg.eval.knn_k, cfg.eval.knn_t))


@pytest.mark.parametrize("seed", [1])
def test_digits_quickstart_learns(tmp_path, seed):
    overrides = SHORT + [f"train.seed={seed}"]
    cmd = [sys.executable, "-m", "moco_xla.launch", "--out", str(tmp_path)]
    for o in overrides:
        cmd += ["--set", o]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PJRT_DEVICE": "CPU"})
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_loss"] < 0.85 * summary["uniform_loss"]  # well below uniform logits
    epochs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert not any(r.get("collapse") for r in epochs if r["type"] == "epoch")
    baseline = random_init_knn(overrides)
    assert summary["knn_top1"] > baseline + 15.0, (summary["knn_top1"], baseline)
    assert summary["knn_top1"] > 85.0
