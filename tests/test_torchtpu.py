"""The TorchTPU backend without a TPU: TorchTpuRuntime's whole collectives contract on real gloo
processes (the class with device="cpu" and process group "gloo"), the replica-count rules per TPU
generation and the pod launch plan in plain Python, the rank layout of a host's processes.
torch_tpu is never imported here (with no libtpu it ends the process; with no TPU it hangs)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dist_fns
from conftest import run_gloo
from moco_xla.errors import UserError
from moco_xla.runtime import make_runtime, replicas
from moco_xla.runtime.detect import TpuChips
from moco_xla.runtime.torchtpu import (PROCESS_GROUP, TorchTpuRuntime, allowed_replicas, launch_plan,
                                       replica_count, to_cpu)


def tpu_on_gloo(rank: int, world: int) -> TorchTpuRuntime:
    return TorchTpuRuntime(rank, world, rank, device=torch.device("cpu"), process_group="gloo")


def contract(rt, cfg):
    """What the training loop asks of a Runtime, on one replica of a TorchTpuRuntime job."""
    out = {"name": rt.name, "group": rt.process_group, "precision": rt.resolve_precision("auto"),
           "compile": rt.compile_backend(cfg.train.compile_backend)}
    out.update(dist_fns.collectives(rt))
    out["bcast"] = dist_fns.broadcasts(rt, 1)
    out["train"] = dist_fns.train_steps(rt, cfg, 2)
    out["rng_len"] = rt.rng_state().numel()
    return out


def test_torchtpu_runtime_runs_the_collectives_contract_on_gloo(tiny_cfg):
    tiny_cfg.train.batch_size = 16  # 8 per replica, divisible by bn_splits=2
    res = run_gloo(contract, 2, tiny_cfg, make=tpu_on_gloo)
    dist_fns.assert_collectives(res)
    for r in res:
        assert (r["name"], r["group"], r["precision"], r["compile"]) == ("torchtpu", "gloo", "bf16", "tpu")
        b = r["bcast"]
        assert torch.equal(b["iface"], b["native"]) and torch.equal(b["via_all_reduce"], b["native"])
        assert torch.equal(b["perm"], res[0]["bcast"]["perm"])
        assert r["rng_len"] == res[0]["rng_len"]
    a, b = res[0]["train"], res[1]["train"]  # gradients averaged: the replicas' encoders stay equal
    for p, q in zip(a["q"] + a["k"], b["q"] + b["k"]):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert int(a["ptr"]) == (2 * 2 * 16) % tiny_cfg.moco.K


def test_torchtpu_precision_compile_and_checkpoint_rules():
    rt = tpu_on_gloo(0, 1)
    assert PROCESS_GROUP == "tpu_dist" and TorchTpuRuntime.__init__.__defaults__[-1] == "tpu_dist"
    assert rt.resolve_precision("auto") == "bf16" and rt.resolve_precision("fp32") == "fp32"
    with pytest.raises(UserError, match="train.precision=fp16 is not supported on backend torchtpu"):
        rt.resolve_precision("fp16")
    with rt.autocast("bf16"):  # autocast on the runtime's device type, bf16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert rt.compile_backend("inductor") == "tpu"
    assert make_runtime("local").compile_backend("inductor") == "inductor"
    # the contrastive logits' and kNN's products: highest precision inside, the setting restored after
    torch.set_float32_matmul_precision("medium")
    try:
        with _MatmulPrecisionSpy() as spy:
            out = rt.precise_matmul(torch.randn(3, 4, dtype=torch.bfloat16), torch.randn(4, 2, dtype=torch.bfloat16))
        assert spy.seen == ["highest"] and out.dtype == torch.float32
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision("highest")
    state = {"model": {"w": torch.ones(2)}, "rng": [torch.zeros(3, dtype=torch.uint8)], "step": 4}
    copied = to_cpu(state)
    assert copied["step"] == 4 and isinstance(copied["rng"], list) and torch.equal(copied["model"]["w"], torch.ones(2))
    assert all(t.device.type == "cpu" for t in (copied["model"]["w"], copied["rng"][0]))


def chips(generation: str, n: int) -> TpuChips:
    return TpuChips((generation,) * n, ())


@pytest.mark.parametrize("generation, n, allowed", [
    ("v5e", 8, (1, 4, 8)), ("v6e", 8, (1, 4, 8)), ("v5e", 4, (1, 4)), ("v5e", 1, (1,)),
    ("v4", 4, (1, 2, 4)), ("v5p", 4, (1, 2, 4)), ("v5p", 8, (1, 2, 4, 8)), ("7x", 2, (1, 2)),
])
def test_replica_counts_follow_the_generation(generation, n, allowed):
    assert allowed_replicas(chips(generation, n)) == allowed
    assert replica_count(None, chips(generation, n)) == allowed[-1]  # default: every chip


def test_replica_count_refuses_what_the_topology_does_not_allow():
    with pytest.raises(UserError, match=r"--cores 2 is not a process count TorchTPU runs on this v5e host "
                                        r"of 8 chip\(s\); valid: 1, 4, 8"):
        replica_count(2, chips("v5e", 8))
    assert replica_count(2, chips("v4", 4)) == 2
    with pytest.raises(UserError, match="found no TPU chips"):
        replica_count(None, TpuChips((), ()))


def test_launch_plan_single_host_and_pod_slice():
    one = launch_plan(8, {})
    assert (one.world_size, one.first_rank, one.hosts, one.master_addr) == (8, 0, 1, "127.0.0.1")
    pod = {"TPU_WORKER_HOSTNAMES": "t1v-w-0,t1v-w-1,t1v-w-2,t1v-w-3", "TPU_WORKER_ID": "2"}
    plan = launch_plan(4, pod)  # a v4-32: 4 hosts x 4 chips
    assert (plan.world_size, plan.first_rank, plan.hosts, plan.master_addr) == (16, 8, 4, "t1v-w-0")
    with pytest.raises(UserError, match="TPU_WORKER_ID=4 is outside TPU_WORKER_HOSTNAMES"):
        launch_plan(4, {**pod, "TPU_WORKER_ID": "4"})


def record_rank(backend, rank, world, local_rank, out):
    Path(out, f"{local_rank}.txt").write_text(f"{backend} {rank} {world} {local_rank}")


def test_a_hosts_processes_take_their_block_of_ranks(tmp_path, monkeypatch):
    """Worker 1 of a 2-host job of 2 processes each runs ranks 2 and 3 of 4 (local ranks 0, 1)."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # set here, so removed after the test
    monkeypatch.setenv("MASTER_PORT", str(replicas.free_port()))
    replicas._spawn_dist("cpu", 2, record_rank, (str(tmp_path),), world=4, first_rank=2)
    got = sorted(p.read_text() for p in tmp_path.glob("*.txt"))
    assert got == ["cpu 2 4 0", "cpu 3 4 1"]


class _MatmulPrecisionSpy(torch.overrides.TorchFunctionMode):
    """Records the fp32 matmul precision in force at each matmul inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__):
            self.seen.append(torch.get_float32_matmul_precision())
        return func(*args, **(kwargs or {}))
