"""Faults on real launcher processes: SIGTERM (preemption), kill -9 at random moments, a NaN loss."""
from __future__ import annotations

import json
import os
import random
import signal
import time

from reliability_fns import (TINY, TWO, assert_same_training_state, cli, final_checkpoint, popen, reference_run,
                             replica_pids, run_inprocess, step_records, wait_for_steps)

from moco_xla.checkpoint import latest_checkpoint, load_checkpoint
from moco_xla.errors import EXIT_NONFINITE, EXIT_PREEMPTED

RUN4 = tuple(TWO + TINY + ["--set", "train.epochs=4"])  # the same run as test_resume's reference


def _stopped(proc, log) -> str:
    assert proc.wait(timeout=240) == EXIT_PREEMPTED, log.read_text()[-3000:]
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    lines = [ln for ln in text.splitlines() if ln.startswith("preempted: ")]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


def test_sigterm_to_the_launcher_checkpoints_and_resumes_exactly(tmp_path):
    """The parent forwards SIGTERM to its 2 replicas; they stop together, write a checkpoint and
    exit 75; ``--resume auto`` then finishes bit-identical to a run that was never stopped."""
    straight = reference_run(RUN4)
    out, log = tmp_path / "run", tmp_path / "log"
    proc = popen(list(RUN4) + ["--out", str(out)], log)
    wait_for_steps(proc, out, 1)
    proc.send_signal(signal.SIGTERM)
    line = _stopped(proc, log)
    ck = load_checkpoint(latest_checkpoint(out))
    assert 1 <= ck["global_step"] < 12
    assert f"after global step {ck['global_step']} " in line and "--resume auto" in line
    assert len(step_records(out)) == ck["global_step"]  # nothing logged past the checkpoint

    p = cli(list(RUN4) + ["--out", str(out), "--resume", "auto"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_training_state(final_checkpoint(straight), final_checkpoint(out))
    assert [r["step"] for r in step_records(out)] == list(range(1, 13))  # no step twice
    assert json.loads((out / "summary.json").read_text())["steps"] == 12


def test_sigterm_to_one_replica_and_its_data_worker_stops_both_replicas_at_one_step(tmp_path):
    """Rank 1 and its DataLoader worker get the signal, rank 0 does not (a preempted VM signals
    processes one by one). The worker ignores a SIGTERM not sent by its replica, rank 0 learns
    of the stop through the log-interval gather, and both stop after the same step."""
    out, log = tmp_path / "run", tmp_path / "log"
    proc = popen(list(RUN4) + ["--set", "data.workers=1", "--out", str(out)], log)
    wait_for_steps(proc, out, 1)
    replicas = replica_pids(proc.pid)
    assert len(replicas) == 2, replicas
    workers = replica_pids(replicas[1])
    assert len(workers) == 1, workers
    for pid in (workers[0], replicas[1]):
        os.kill(pid, signal.SIGTERM)
    line = _stopped(proc, log)  # the launcher reports rank 0's reason: rank 0 stopped on its own
    step = load_checkpoint(latest_checkpoint(out))["global_step"]
    assert line.startswith(f"preempted: stopped on SIGTERM after global step {step} ")


def test_kill9_at_random_moments_resumes_from_the_last_good_checkpoint(tmp_path):
    """kill -9 three times at seeded random moments (checkpoints every step, so kills also land
    mid-write); each rerun of the same command resumes the newest committed checkpoint and
    the run finishes with the same state as one never killed."""
    args = TINY + ["--set", "train.epochs=6", "--set", "checkpoint.every_steps=1", "--set", "checkpoint.keep=2"]
    straight = reference_run(tuple(args), subprocess_run=False)
    out, rng, kills, resumed_from = tmp_path / "run", random.Random(1234), 0, []
    for attempt in range(8):
        log = tmp_path / f"log{attempt}"
        proc = popen(args + ["--out", str(out), "--resume", "auto"], log)
        if kills < 3:
            done = len(step_records(out))
            wait_for_steps(proc, out, done + rng.randint(1, 3))  # a random step, then a random
            time.sleep(rng.uniform(0.0, 0.2))                    # moment within the next ones
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                expected = latest_checkpoint(out)
                resumed_from.append(expected)
                continue
        assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
        break
    assert kills == 3
    for i, expected in enumerate(resumed_from):  # each rerun started from the newest good checkpoint
        text = (tmp_path / f"log{i + 1}").read_text()
        assert (f"resuming {expected} " in text) if expected else "starting from scratch" in text
    assert json.loads((out / "summary.json").read_text())["steps"] == 18
    assert_same_training_state(final_checkpoint(straight), final_checkpoint(out))
    assert [r["step"] for r in step_records(out)] == list(range(1, 19))


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    args = TINY + ["--out", str(out)]
    assert run_inprocess(args + ["--set", "train.epochs=1"]) == 0
    good = out / "checkpoints" / "ckpt-000000003.pt"
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    capsys.readouterr()
    # an lr of 1e30 from epoch 2 on blows the weights up: the loss turns inf/NaN a step later
    assert run_inprocess(args + ["--set", "train.epochs=3", "--set", "train.lr=1e30", "--resume", "auto"]) \
        == EXIT_NONFINITE
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1
    first_bad = next(r["step"] for r in step_records(out) if r["loss"] is None)  # null: NaN/inf logged
    assert f"loss became NaN/inf at global step {first_bad} " in errors[0] and str(good) in errors[0]
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} == before
    assert latest_checkpoint(out) == str(good)
