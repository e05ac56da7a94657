"""Checkpoints on gs:// against a real GCS emulator (fake-gcs-server): commit, keep-K, exact resume."""
from __future__ import annotations

import pytest

from reliability_fns import TINY, assert_same_training_state, run_inprocess

from moco_xla.checkpoint import CheckpointStore, latest_checkpoint, load_checkpoint, read_bytes
from moco_xla.data.emulator import gcs_emulator
from test_checkpoint import _payload

RUN2 = TINY + ["--set", "train.epochs=2", "--set", "eval.max_bank=64"]


@pytest.fixture(scope="module")
def gcs():
    with gcs_emulator(buckets=["ckpt"]) as url:
        yield url


def test_store_on_gcs_commits_pointer_last_and_prunes(gcs):
    store = CheckpointStore("gs://ckpt/unit", keep=2)
    for step in (3, 6, 9):
        store.write(*_payload(step))
    import fsspec
    fs, _ = fsspec.core.url_to_fs("gs://ckpt/unit")
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls("ckpt/unit", detail=False))
    assert names == ["ckpt-000000006.json", "ckpt-000000006.pt", "ckpt-000000009.json", "ckpt-000000009.pt",
                     "latest"]
    assert read_bytes("gs://ckpt/unit/latest") == b"ckpt-000000009.pt"
    assert latest_checkpoint("gs://ckpt/unit") == "gs://ckpt/unit/ckpt-000000009.pt"
    assert load_checkpoint("gs://ckpt/unit/ckpt-000000009.pt")["model"]["w"][0] == 9
    fs.pipe_file("ckpt/unit/ckpt-000000012.pt", _payload(12)[0])  # uploaded, never committed
    assert latest_checkpoint("gs://ckpt/unit").endswith("ckpt-000000009.pt")


def test_resume_from_gcs_continues_exactly(gcs, tmp_path):
    """A 2-epoch run checkpointing to gs://; a second run resumes its epoch-1 checkpoint from gs://."""
    a, b = "gs://ckpt/run-a", "gs://ckpt/run-b"
    assert run_inprocess(RUN2 + ["--set", f"checkpoint.dir={a}", "--out", str(tmp_path / "a")]) == 0
    assert latest_checkpoint(a) == f"{a}/ckpt-000000006.pt"
    assert not (tmp_path / "a" / "checkpoints").exists()
    assert run_inprocess(RUN2 + ["--set", f"checkpoint.dir={b}", "--out", str(tmp_path / "b"),
                                 "--resume", f"{a}/ckpt-000000003.pt"]) == 0
    assert_same_training_state(load_checkpoint(latest_checkpoint(a)), load_checkpoint(latest_checkpoint(b)))
    # --resume auto on a finished run: nothing left to train, the summary is written again
    assert run_inprocess(RUN2 + ["--set", f"checkpoint.dir={a}", "--out", str(tmp_path / "a"),
                                 "--resume", "auto"]) == 0
    assert latest_checkpoint(a) == f"{a}/ckpt-000000006.pt"
