"""What differs past one replica thread and one host: the XLA broadcast of 0-dim buffers, pod-slice
world sizes, shared checkpoints across hosts, the rehearsal's version guard, empty configs."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from moco_xla import launch
from moco_xla.config import load_config, validate_world
from moco_xla.errors import UserError
from moco_xla.runtime import Runtime, plan


class _TwoReplicas(Runtime):
    """The broadcast-from-all_reduce arithmetic of a 2-replica job, seen from rank 0 (the real
    4-replica collectives run in test_xla_replicas.py)."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"), rank=0, world_size=2)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        return self.broadcast_by_all_reduce(t, src)


def test_sync_module_keeps_the_shape_of_0dim_buffers():
    bn = nn.BatchNorm2d(4)
    bn.num_batches_tracked.fill_(3)
    _TwoReplicas().sync_module(bn)  # raised "output with shape [] doesn't match [1]" before
    assert bn.num_batches_tracked.shape == () and int(bn.num_batches_tracked) == 3
    nan = torch.full((3,), float("nan"))
    assert not torch.isnan(_TwoReplicas().broadcast_by_all_reduce(nan, src=1)).any()  # only src's values count


def test_pod_slice_world_size_is_all_hosts_cores(monkeypatch):
    monkeypatch.setattr(plan, "hosts", lambda backend: 4)  # a v4-32: 4 TPU VMs of 4 devices
    assert plan.world_size("xla", 4) == 16
    with pytest.raises(UserError, match="--cores 1 on a TPU pod slice of 4 hosts"):
        plan.world_size("xla", 1)
    cfg = load_config("tiny", ["train.batch_size=40", "moco.K=240", "model.bn_splits=1"])  # 4 divides it, 16 does not
    validate_world(cfg, 4)
    with pytest.raises(UserError, match="must be divisible by the 16 replicas"):
        validate_world(cfg, plan.world_size("xla", 4))


def test_several_hosts_need_a_shared_checkpoint_dir(tmp_path):
    cfg = load_config("tiny")
    launch.check_hosts(cfg, 1, tmp_path)  # one host: local checkpoints are fine
    with pytest.raises(UserError, match="runs on 4 hosts; set --set checkpoint.dir=gs://") as e:
        launch.check_hosts(cfg, 4, tmp_path)
    assert "\n" not in str(e.value)
    launch.check_hosts(load_config("tiny", ["checkpoint.dir=gs://bucket/run"]), 4, tmp_path)


@pytest.mark.needs_xla
def test_rehearsal_refuses_a_torch_xla_it_was_not_verified_on(monkeypatch):
    import torch_xla
    from moco_xla.runtime import rehearsal
    rehearsal.check_version()  # the installed 2.9
    monkeypatch.setattr(torch_xla, "__version__", "2.11.0")
    with pytest.raises(UserError, match="verified on torch_xla 2.9.x, found 2.11.0"):
        rehearsal.check_version()


def test_empty_config_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert launch.main(["--config", str(empty), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config ") and "is empty" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_imagenet_configs_bound_the_knn_bank():
    for name in ("moco_v1_imagenet", "moco_v2_imagenet"):
        assert 0 < load_config(name).eval.max_bank <= 65536
    with pytest.raises(UserError, match="eval.max_bank"):
        load_config("moco_v2_imagenet", ["eval.max_bank=0"])
