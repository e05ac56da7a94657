"""Exact continuation: a run stopped and resumed ends bit-identical to one that never stopped.

Bit-identical (torch.equal), not merely close: the checkpoint restores every replica's own
RNG state (augmentations and the shuffle-BN permutation draw from it), the sampler's epoch
and position, the DataLoader's seed generator, the optimizer's momentum and the epoch's
running loss sums, and CPU arithmetic is deterministic for the same sequence of operations.
"""
from __future__ import annotations

import json

import pytest

from reliability_fns import (TINY, TWO, assert_same_training_state, cli, final_checkpoint, reference_run,
                             run_inprocess, step_records)

from moco_xla.checkpoint import load_checkpoint

RUN4 = tuple(TWO + TINY + ["--set", "train.epochs=4"])  # 2 gloo replicas, 4 epochs of 3 steps


def test_two_replicas_2_epochs_resume_2_epochs_is_bit_identical(tmp_path):
    straight = reference_run(RUN4)
    out = tmp_path / "resumed"
    p = cli(list(RUN4) + ["--out", str(out), "--resume", str(straight / "checkpoints" / "ckpt-000000006.pt")])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming" in p.stdout and "(epoch 3, step 0)" in p.stdout
    assert_same_training_state(final_checkpoint(straight), final_checkpoint(out))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (straight, out))
    assert a["final_loss"] == b["final_loss"] and a["steps"] == b["steps"] == 12
    assert [r["step"] for r in step_records(out)] == list(range(7, 13))


def test_mid_epoch_checkpoint_resumes_exactly(tmp_path):
    """checkpoint.every_steps=2: ckpt-4 is epoch 2, step 1 of 3; the rest of that epoch and the next."""
    args = TINY + ["--set", "train.epochs=3", "--set", "checkpoint.every_steps=2"]
    straight = reference_run(tuple(args), subprocess_run=False)
    mid = load_checkpoint(straight / "checkpoints" / "ckpt-000000004.pt")
    assert (mid["epoch"], mid["step_in_epoch"]) == (1, 1)
    out2 = tmp_path / "from-mid"
    assert run_inprocess(args + ["--out", str(out2), "--resume", str(straight / "checkpoints" /
                                                                   "ckpt-000000004.pt")]) == 0
    assert_same_training_state(final_checkpoint(straight), final_checkpoint(out2))
    assert [r["step"] for r in step_records(out2)] == list(range(5, 10))
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (straight, out2))
    assert s1["final_loss"] == s2["final_loss"]  # the epoch's running sums came back too


def test_resume_on_fewer_replicas_keeps_the_data_position(tmp_path):
    """A 2-replica checkpoint resumed by 1 replica: allowed (same global batch), warned, completes."""
    straight = reference_run(RUN4)
    out = tmp_path / "one"
    args = TINY + ["--set", "train.epochs=4", "--out", str(out),
                   "--resume", str(straight / "checkpoints" / "ckpt-000000009.pt")]
    with pytest.warns(RuntimeWarning, match="written by 2 replicas, resuming on 1"):
        assert run_inprocess(args) == 0
    ck = final_checkpoint(out)
    assert ck["global_step"] == 12 and ck["world_size"] == 1 and len(ck["rng"]) == 1
    assert json.loads((out / "summary.json").read_text())["steps"] == 12


def test_resume_from_the_final_checkpoint_runs_only_the_final_knn(tmp_path):
    """The last checkpoint is written before the final kNN: a run that died in the kNN (say, out of
    memory on a large bank) resumes into the kNN alone, without training the last epoch again."""
    import shutil
    out = tmp_path / "run"
    args = list(TINY) + ["--set", "train.epochs=1", "--out", str(out)]
    assert run_inprocess(args) == 0
    done = json.loads((out / "summary.json").read_text())
    final = load_checkpoint(str(sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1]))
    assert final["progress"]["knn_epoch"] == 0  # saved before its kNN ran
    # as if the process died inside the final kNN: no summary, no epoch record yet
    (out / "summary.json").unlink()
    kept = [ln for ln in (out / "metrics.jsonl").read_text().splitlines() if '"type": "epoch"' not in ln]
    (out / "metrics.jsonl").write_text("".join(f"{ln}\n" for ln in kept))
    shutil.rmtree(out / "tensorboard", ignore_errors=True)
    assert run_inprocess(args + ["--resume", "auto"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["knn_top1"] == done["knn_top1"] and again["steps"] == done["steps"] == 3
    assert len(step_records(out)) == 3  # no step trained twice
