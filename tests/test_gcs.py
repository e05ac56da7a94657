"""Shards on Google Cloud Storage, against the real fake-gcs-server emulator on loopback."""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import pytest

from data_fixtures import write_mnist
from moco_xla import data, shards
from moco_xla.config import load_config
from moco_xla.data import storage
from moco_xla.errors import UserError
from shard_helpers import image_index, shard_set, write_indexed

BUCKET = "moco-test"


@pytest.fixture(scope="module")
def gcs():
    """The emulator with one bucket; STORAGE_EMULATOR_HOST is set while it runs (children inherit it)."""
    from moco_xla.data.emulator import gcs_emulator
    with gcs_emulator([BUCKET]) as url:
        yield url
    assert "STORAGE_EMULATOR_HOST" not in os.environ  # stopped


@pytest.fixture(scope="module")
def indexed_gs(gcs):
    root = f"gs://{BUCKET}/indexed"
    write_indexed(root, n=150, shard_size=13, test_n=30)
    return root


def test_shards_cli_writes_to_a_bucket(gcs, tmp_path, capsys):
    write_mnist(tmp_path, n=40, test_n=10, gz=True)
    out = f"gs://{BUCKET}/mnist"
    assert shards.main(["--dataset", "mnist", "--root", str(tmp_path), "--out", out, "--shard-size", "16",
                        "--quiet", "--workers", "2"]) == 0
    fs, _ = storage.filesystem(out)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{BUCKET}/mnist/train")) == \
        ["manifest.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    m = json.loads(storage.read_bytes(f"{out}/test/manifest.json"))
    assert (m["total"], m["dataset"]) == (10, "mnist")
    b = data.build(load_config("tiny", ["data.dataset=mnist", f"data.root={out}"]))
    assert (len(b.bank), len(b.test), b.num_classes) == (40, 10, 10)
    x, y, valid = next(iter(data.eval_loader(b.test, 16, 0, 1)))
    assert x.shape == (16, 1, 16, 16) and int(valid.sum()) == 10 and (y[valid] >= 0).all()


def test_stream_from_bucket_two_replicas_two_workers_once_each(indexed_gs):
    seen, steps = collections.Counter(), []
    for rank in range(2):
        loader = data.pretrain_loader(shard_set(indexed_gs), 8, rank, 2, seed=1, workers=2)
        loader.set_epoch(2)
        batches = list(loader)
        steps.append((len(loader), len(batches)))
        seen.update(i for q, _ in batches for i in image_index(q).tolist())
    assert steps == [(9, 9), (9, 9)]  # 150 // 16 steps on both replicas, from the manifest
    assert len(seen) == 144 and set(seen.values()) == {1}  # 6 dropped, none twice


def test_check_names_missing_bucket_and_shards(gcs):
    cfg = load_config("tiny", ["data.root=gs://no-such-bucket/x"])
    with pytest.raises(UserError, match="bucket gs://no-such-bucket does not exist"):
        data.check(cfg)
    cfg = load_config("tiny", [f"data.root=gs://{BUCKET}/nothing-here"])
    with pytest.raises(UserError, match=f"gs://{BUCKET}/nothing-here/train/manifest.json does not exist"):
        data.check(cfg)


def test_truncated_shard_in_bucket(indexed_gs, gcs):
    """A shard cut inside a member (tarfile stops on it) or between two samples (a shorter tar
    that ends cleanly): either way the run stops on one line naming the shard."""
    root = f"gs://{BUCKET}/damaged"
    write_indexed(root, n=32, shard_size=16, test_n=16)
    blob = storage.read_bytes(f"{root}/train/shard-000001.tar")
    assert len(blob) // 2 % 2048 == 0  # 16 samples of 4 tar blocks each: the half is between two samples
    for cut, message in ((len(blob) // 2 + 700, "truncated or corrupt tar after 10 samples"),
                         (len(blob) // 2, r"holds 10 samples but the manifest lists 16 \(truncated\?\)")):
        storage.write_bytes(f"{root}/train/shard-000001.tar", blob[:cut])
        loader = data.pretrain_loader(shard_set(root), 8, 0, 1, seed=0, workers=0)
        loader.set_epoch(0)
        with pytest.raises(UserError, match=f"shard {root}/train/shard-000001.tar: {message}"):
            list(loader)


def test_launch_two_replicas_streaming_from_bucket(gcs, tmp_path):
    """End to end: pack digits into the bucket, train on 2 gloo replicas, kNN on test shards."""
    out = f"gs://{BUCKET}/digits"
    assert shards.main(["--dataset", "digits", "--out", out, "--shard-size", "200", "--quiet"]) == 0
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "moco_xla.launch", "--backend", "cpu", "--cores", "2", "--config", "tiny",
           "--out", str(run), "--set", f"data.root={out}", "--set", "data.workers=0",
           "--set", "train.epochs=1", "--set", "data.on_bad_sample=skip"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert (s["world_size"], s["steps"], s["skipped_samples"]) == (2, 3, 0)
    assert s["knn_top1"] is not None and 0 < s["knn_top1"] <= 100
