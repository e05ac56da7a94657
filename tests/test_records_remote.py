"""A run's records beside its gs:// checkpoints (moco_xla/records.py), where every host of a pod slice and
every resume find them, against the real fake-gcs-server emulator; and tpu_scripts/logs.sh reading them.

logs.sh calls ``gcloud storage cat``; gcloud is not installed here, so a stand-in ``gcloud`` on PATH
answers that one subcommand by reading the emulator through moco_xla's own storage layer.
"""
from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reliability_fns import TINY, run_inprocess

from moco_xla.data import storage
from moco_xla.records import RecordsMirror, records_url
from moco_xla.report import MetricsWriter, read_metrics

BUCKET = "records"
CKPT = f"gs://{BUCKET}/run"
RECORDS = f"{CKPT}/records"
LOGS = Path(__file__).resolve().parent.parent / "tpu_scripts" / "logs.sh"


@pytest.fixture(scope="module")
def gcs():
    from moco_xla.data.emulator import gcs_emulator
    with gcs_emulator([BUCKET]) as url:
        yield url


@pytest.fixture(scope="module")
def resumed_run(gcs, tmp_path_factory):
    """One epoch with checkpoint.dir on gs://, then ``--resume auto`` to two epochs from an empty --out (as
    on another host). Returns the two --out directories and what the bucket held after the first run."""
    base = tmp_path_factory.mktemp("records")
    a, b = base / "a", base / "b"
    ckpt = ["--set", f"checkpoint.dir={CKPT}"]
    assert run_inprocess(TINY + ckpt + ["--set", "train.epochs=1", "--out", str(a)]) == 0
    first = {name: storage.read_bytes(f"{RECORDS}/{name}") for name in ("metrics.jsonl", "summary.json", "host")}
    first["listing"] = remote_names(RECORDS)
    summary = json.loads(first["summary.json"])  # a key another command added to the run's summary
    storage.write_bytes(f"{RECORDS}/summary.json", json.dumps({**summary, "note": "kept"}).encode())
    assert run_inprocess(TINY + ckpt + ["--set", "train.epochs=2", "--out", str(b), "--resume", "auto"]) == 0
    return a, b, first


def remote_names(url: str) -> list[str]:
    fs, path = storage.filesystem(url)
    return sorted(p[len(path) + 1:] for p in fs.find(path))


def test_run_copies_its_records_beside_the_checkpoints(resumed_run):
    a, _, first = resumed_run
    assert first["metrics.jsonl"] == (a / "metrics.jsonl").read_bytes()
    assert [(r["type"], r["step"]) for r in read_metrics(a)] == [("step", 1), ("step", 2), ("step", 3), ("epoch", 3)]
    summary = json.loads(first["summary.json"])
    assert summary == json.loads((a / "summary.json").read_text()) and summary["steps"] == 3
    assert first["host"].decode().strip() == socket.gethostname()
    names = first["listing"]
    assert "config.yaml" in names and "plots/loss.png" in names
    assert sum(n.startswith("tensorboard/events.out.tfevents.") for n in names) == 1


def test_resume_from_an_empty_out_restores_and_appends(resumed_run):
    a, b, first = resumed_run
    local = (b / "metrics.jsonl").read_bytes()
    assert local.startswith(first["metrics.jsonl"])  # the first run's history, kept as it was
    steps = [(r["type"], r["epoch"], r["step"]) for r in read_metrics(b)]
    assert steps == [("step", 1, 1), ("step", 1, 2), ("step", 1, 3), ("epoch", 1, 3),
                     ("step", 2, 4), ("step", 2, 5), ("step", 2, 6), ("epoch", 2, 6)]
    assert storage.read_bytes(f"{RECORDS}/metrics.jsonl") == local
    summary = json.loads(storage.read_bytes(f"{RECORDS}/summary.json"))
    assert (summary["steps"], summary["epochs"], summary["note"]) == (6, 2, "kept")
    assert json.loads((b / "summary.json").read_text()) == summary
    names = remote_names(RECORDS)
    assert sum(n.startswith("tensorboard/events.out.tfevents.") for n in names) == 2  # one per session


def test_restore_keeps_the_fuller_history(gcs, tmp_path):
    url = f"gs://{BUCKET}/restore"
    lines = [json.dumps({"type": "step", "step": s}) for s in range(1, 7)]
    remote = "".join(f"{line}\n" for line in lines[:4])  # the bucket: steps 1-4
    storage.write_bytes(f"{url}/metrics.jsonl", remote.encode())
    storage.write_bytes(f"{url}/summary.json", b'{"steps": 4}')
    host = tmp_path / "this-host"
    host.mkdir()
    (host / "metrics.jsonl").write_text("".join(f"{line}\n" for line in lines) + '{"type": "st')  # cut by a kill
    assert not RecordsMirror(host, url).restore(global_step=5)  # here 5 records up to step 5, there 4
    assert len((host / "metrics.jsonl").read_text().splitlines()) == 7
    assert RecordsMirror(host, url).restore(global_step=3)  # as many there: the bucket's copy is the record
    assert (host / "metrics.jsonl").read_text() == remote
    assert json.loads((host / "summary.json").read_text()) == {"steps": 4}
    fresh = tmp_path / "new-host"
    assert RecordsMirror(fresh, url).restore(global_step=4) and (fresh / "metrics.jsonl").read_text() == remote
    assert not RecordsMirror(tmp_path / "other", f"gs://{BUCKET}/never-written").restore(global_step=4)


def test_uploads_throttled_at_log_intervals_forced_by_sync(gcs, tmp_path):
    now = [0.0]
    url = f"gs://{BUCKET}/throttle"
    w = MetricsWriter(tmp_path, plots=False, mirror=RecordsMirror(tmp_path, url, clock=lambda: now[0]))

    def remote_steps() -> list[int]:
        data = storage.read_bytes_or_none(f"{url}/metrics.jsonl") or b""
        return [json.loads(line)["step"] for line in data.decode().splitlines()]

    for step in (1, 2):
        w.write({"type": "step", "step": step, "loss": 1.0})
    assert remote_steps() == [1]  # the first log goes at once, the next waits for the interval
    now[0] = 59.0
    w.write({"type": "step", "step": 3, "loss": 1.0})
    assert remote_steps() == [1]
    now[0] = 61.0
    w.write({"type": "step", "step": 4, "loss": 1.0})
    assert remote_steps() == [1, 2, 3, 4]
    w.write({"type": "epoch", "step": 4, "loss": 1.0})
    w.sync()  # after a checkpoint or an epoch's record: now
    assert remote_steps() == [1, 2, 3, 4, 4]
    assert not any(n.startswith("tensorboard/") for n in remote_names(url))  # TensorBoard: every 10 min
    now[0] = 700.0
    w.write({"type": "step", "step": 5, "loss": 1.0})
    assert any(n.startswith("tensorboard/") for n in remote_names(url)) and remote_steps()[-1] == 5
    w.write({"type": "step", "step": 6, "loss": 1.0})
    w.close()
    assert storage.read_bytes(f"{url}/metrics.jsonl") == (tmp_path / "metrics.jsonl").read_bytes()
    assert records_url(str(tmp_path)) is None and records_url("gs://b/run/") == "gs://b/run/records"


def test_failed_upload_warns_and_is_retried(gcs, tmp_path):
    url = "gs://late-bucket/run/records"
    w = MetricsWriter(tmp_path, plots=False, tensorboard=False, mirror=RecordsMirror(tmp_path, url))
    with pytest.warns(RuntimeWarning, match="could not upload gs://late-bucket/run/records/metrics.jsonl"):
        w.write({"type": "step", "step": 1, "loss": 1.0})
    assert read_metrics(tmp_path) == [{"type": "step", "step": 1, "loss": 1.0}]  # training goes on
    fs, _ = storage.filesystem(url)
    fs.mkdir("late-bucket")
    w.sync()
    assert storage.read_bytes(f"{url}/metrics.jsonl") == (tmp_path / "metrics.jsonl").read_bytes()
    w.close()


# ----------------------------------------------------------------------------- tpu_scripts/logs.sh

def stand_ins(tmp_path: Path, hostname: str = "") -> dict[str, str]:
    """PATH with a ``gcloud`` that answers ``gcloud storage cat URL`` from the emulator (and a
    ``hostname`` that prints ``hostname``, where given)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    gcloud = bin_ / "gcloud"
    gcloud.write_text(f'#!/bin/sh\n[ "$1 $2" = "storage cat" ] || exit 3\n'
                      f'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false exec {sys.executable} -c "'
                      'import sys, fsspec; sys.stdout.buffer.write(fsspec.open(sys.argv[1], token=\'anon\').open().read())'
                      '" "$3" 2>/dev/null\n')
    gcloud.chmod(0o755)
    if hostname:
        (bin_ / "hostname").write_text(f"#!/bin/sh\necho {hostname}\n")
        (bin_ / "hostname").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}"}


def test_logs_prints_the_records_from_the_bucket(resumed_run, tmp_path):
    _, b, _ = resumed_run
    res = subprocess.run([str(LOGS), "--ckpt", CKPT, "--records", "--no-follow", "--lines", "3"],
                         env=stand_ins(tmp_path), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == (b / "metrics.jsonl").read_text().splitlines()[-3:]
    res = subprocess.run([str(LOGS), "--ckpt", f"gs://{BUCKET}/no-run", "--records", "--no-follow"],
                         env=stand_ins(tmp_path), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.startswith(f"error: no records at gs://{BUCKET}/no-run/records")


def test_logs_follows_the_records_as_they_are_uploaded(gcs, tmp_path):
    url = f"gs://{BUCKET}/follow/records/metrics.jsonl"
    storage.write_bytes(url, b"1\n2\n3\n")
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        proc = subprocess.Popen([str(LOGS), "--ckpt", f"gs://{BUCKET}/follow", "--records", "--lines", "2",
                                 "--every", "1"], env=stand_ins(tmp_path), stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for(out, ["2", "3"])
        storage.write_bytes(url, b"1\n2\n3\n4\n5\n")  # the next upload
        wait_for(out, ["2", "3", "4", "5"])
        storage.write_bytes(url, b"1\n2\n3\n4b\n")  # a resumed run rewrote the file from step 3
        wait_for(out, ["2", "3", "4", "5",
                       f"== {url} was rewritten: a resumed run continues from its checkpoint ==", "3", "4b"])
    finally:
        proc.kill()
        proc.wait()


def wait_for(path: Path, lines: list[str], timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.read_text().splitlines() == lines:
            return
        time.sleep(0.1)
    assert path.read_text().splitlines() == lines


def test_logs_follows_the_worker_the_bucket_names(resumed_run, tmp_path):
    """--ckpt with --worker auto: every worker compares its hostname with <ckpt>/records/host; only the
    writer prints its train.log, though another worker still holds a metrics.jsonl from before."""
    dry = subprocess.run([str(LOGS), "--name", "moco", "--zone", "us-central2-b", "--run", "c10", "--ckpt", CKPT,
                          "--no-follow", "--lines", "1", "--dry-run"], capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    argv = shlex.split(dry.stdout)
    assert "--worker=all" in argv
    command = argv[argv.index("--command") + 1]
    writer = socket.gethostname()
    for name in ("stale-host", writer):
        run = tmp_path / name / "moco_xla_runs" / "c10"
        run.mkdir(parents=True)
        (run / "train.log").write_text(f"{name} 1\n{name} 2\n")
        (run / "metrics.jsonl").write_text("{}\n")
        res = subprocess.run(["bash", "-c", command], cwd=tmp_path / name, env=stand_ins(tmp_path / name, name),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        expected = [f"== {writer} writes c10's records ==", f"{writer} 2"] if name == writer else []
        assert res.stdout.splitlines() == expected
