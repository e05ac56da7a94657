"""The offline digits quickstart learns, through the real CLI.

A shortened run of the quickstart (``python -m moco_xla.launch``: configs/digits.yaml, 12 epochs,
the nearest key's warm-up 6, width 16; measured: seed 0 kNN 96.3% against 66.3% for the same
encoder randomly initialised; final loss 7.1 against the uniform-logits 13.9) must beat the random
encoder by a wide margin. It is the session's one pre-training (tests/eval_fns.pretrained_run):
the evaluation and report tests use its checkpoints.
"""
from __future__ import annotations

import json

from eval_fns import PRETRAIN_SET, pretrained_run, random_init_knn


def test_digits_quickstart_learns(tmp_path_factory):
    out = pretrained_run(tmp_path_factory)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"] == "digits" and summary["epochs"] == 12, summary
    assert summary["final_loss"] < 0.85 * summary["uniform_loss"]  # well below uniform logits
    epochs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert not any(r.get("collapse") for r in epochs if r["type"] == "epoch")
    baseline = random_init_knn("digits", PRETRAIN_SET)
    assert summary["knn_top1"] > baseline + 15.0, (summary["knn_top1"], baseline)
    assert summary["knn_top1"] > 85.0
