"""Checkpoint storage and format on a local disk: atomic commits, keep-K, latest, loading errors."""
from __future__ import annotations

import json
import os

import pytest
import torch

from moco_xla.checkpoint import (CheckpointStore, Position, check_compatible, checkpoint_meta,
                                 latest_checkpoint, load_checkpoint, resolve_resume, save_checkpoint)
from moco_xla.config import load_config
from moco_xla.errors import NonFiniteLoss, UserError
from moco_xla.runtime import make_runtime
from moco_xla.guards import StopGuard
from moco_xla.train import build_model, build_optimizer


def _payload(step: int) -> tuple[bytes, dict]:
    import io
    buf = io.BytesIO()
    torch.save({"format": 1, "config": {}, "model": {"w": torch.full((2,), float(step))}}, buf)
    return buf.getvalue(), {"global_step": step, "epoch": 0, "step_in_epoch": step}


def test_store_keeps_newest_k_and_points_latest_at_the_newest(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=2)
    for step in (3, 6, 9, 12):
        store.write(*_payload(step))
    names = sorted(os.listdir(tmp_path))
    assert names == ["ckpt-000000009.json", "ckpt-000000009.pt", "ckpt-000000012.json", "ckpt-000000012.pt",
                     "latest"]
    assert (tmp_path / "latest").read_text() == "ckpt-000000012.pt"
    assert latest_checkpoint(tmp_path) == f"{tmp_path}/ckpt-000000012.pt"
    assert load_checkpoint(latest_checkpoint(tmp_path))["model"]["w"][0] == 12
    assert json.loads((tmp_path / "ckpt-000000012.json").read_text())["global_step"] == 12


def test_an_interrupted_write_never_becomes_latest(tmp_path):
    """What a kill leaves behind: a temporary file, or a .pt without its .json commit mark."""
    store = CheckpointStore(str(tmp_path), keep=3)
    store.write(*_payload(3))
    (tmp_path / ".ckpt-000000006.pt.tmp-4242").write_bytes(b"half a checkpoint")
    (tmp_path / "ckpt-000000006.pt").write_bytes(_payload(6)[0])  # killed before its .json
    assert latest_checkpoint(tmp_path).endswith("ckpt-000000003.pt")
    (tmp_path / "latest").unlink()  # killed even before the pointer ever existed: listing decides
    assert latest_checkpoint(tmp_path).endswith("ckpt-000000003.pt")
    store.write(*_payload(9))
    assert not list(tmp_path.glob(".ckpt-*"))  # the dead writer's temporary file is cleaned up
    assert latest_checkpoint(tmp_path).endswith("ckpt-000000009.pt")


def test_latest_accepts_a_run_directory(tmp_path):
    CheckpointStore(str(tmp_path / "checkpoints"), keep=1).write(*_payload(4))
    assert latest_checkpoint(tmp_path).endswith("checkpoints/ckpt-000000004.pt")
    assert resolve_resume(str(tmp_path), "unused").endswith("ckpt-000000004.pt")
    assert resolve_resume("auto", str(tmp_path / "checkpoints")).endswith("ckpt-000000004.pt")
    assert resolve_resume("auto", str(tmp_path / "elsewhere")) is None
    assert resolve_resume(None, str(tmp_path)) is None


def test_load_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "cut.pt").write_bytes(_payload(1)[0][:200])  # a truncated zip
    with pytest.raises(UserError, match="is unreadable"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(UserError, match="not a moco_xla checkpoint"):
        load_checkpoint(tmp_path / "list.pt")


def test_compatibility_names_the_differing_key_and_allows_schedule_changes():
    old = load_config("tiny")
    new = load_config("tiny", ["model.arch=resnet18", "moco.K=512", "train.epochs=9", "train.lr=0.01",
                               "eval.knn_k=5", "checkpoint.keep=1"])
    with pytest.raises(UserError, match=r"model\.arch='small_resnet' but this run has model\.arch='resnet18' "
                                        r"\(also differs: moco\.K\)"):
        check_compatible(old.to_dict(), new, "ck.pt")
    fine = load_config("tiny", ["train.epochs=9", "train.lr=0.01", "eval.knn_k=5", "checkpoint.keep=1"])
    assert check_compatible(old.to_dict(), fine, "ck.pt") == ["train.epochs", "train.lr", "eval.knn_k",
                                                               "checkpoint.keep"]


def test_checkpoint_holds_everything_a_resume_needs(tmp_path):
    """Both encoders, queue and pointer, optimizer, position, RNG per replica, config; meta without torch."""
    cfg = load_config("tiny")
    rt = make_runtime("local")
    model = build_model(cfg, rt)
    opt = build_optimizer(cfg, model)
    pos = Position(epoch=1, step=2, global_step=5, knn_top1=12.5)
    store = CheckpointStore(str(tmp_path), keep=2)
    path = save_checkpoint(rt, store, cfg, model, opt, None, pos, 0.03, torch.tensor([4.0, 1.5]))
    ck = load_checkpoint(path)
    keys = set(ck["model"])
    assert {"queue", "queue_ptr"} <= keys
    assert any(k.startswith("encoder_q.") for k in keys) and any(k.startswith("encoder_k.") for k in keys)
    assert ck["config"] == cfg.to_dict() and ck["epoch"] == 1 and ck["step_in_epoch"] == 2
    assert ck["global_step"] == 5 and ck["lr"] == 0.03 and ck["world_size"] == 1
    assert torch.equal(ck["rng"][0], torch.get_rng_state())
    assert torch.equal(ck["sums"][0], torch.tensor([4.0, 1.5])) and ck["progress"]["knn_top1"] == 12.5
    assert "param_groups" in ck["optimizer"]
    assert checkpoint_meta(path)["global_step"] == 5  # from the .json, without loading the tensors


def _guard(flag: list[bool]) -> StopGuard:
    return StopGuard(make_runtime("local"), global_step=10, steps_per_epoch=4, stop_requested=lambda: flag[0])


def test_stop_guard_names_the_first_non_finite_step():
    guard = _guard([False])
    for value in (1.0, 2.0, float("nan"), 3.0, float("inf")):  # global steps 11..15
        guard.observe(torch.tensor(value))
    guard.last_checkpoint = "ck/ckpt-000000008.pt"
    with pytest.raises(NonFiniteLoss, match=r"global step 13 \(epoch 4, step 1/4\).*ckpt-000000008\.pt"):
        guard.agree()


def test_stop_guard_polls_one_interval_behind():
    """A stop request is seen at the log interval after it was gathered: no wait on the device."""
    flag = [False]
    guard = _guard(flag)
    assert guard.poll() is False
    flag[0] = True
    assert guard.poll() is False  # gathered now, read at the next interval
    assert guard.poll() is True
    assert _guard([True]).agree() is True
