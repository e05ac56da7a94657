"""The multi-replica XLA path on 4 real XLA:CPU replicas: xm collectives, shuffle BN, data
parallelism, kNN, and whole launches (checkpoint and resume, SIGTERM, a bad sample).

Each test starts a child process whose replicas are threads sharing one PJRT CPU client
(runtime/rehearsal.py), exactly as ``python -m moco_xla.launch --backend xla --cores 4``.
"""
from __future__ import annotations

import copy

import pytest
import torch

import dist_fns
import xla_fns
from xla_replicas import run_replicas

pytestmark = pytest.mark.needs_xla  # XLA:CPU replicas: skipped where torch_xla is not installed

N = 4


PER, STEPS = 8, 6


@pytest.fixture(scope="module")
def replicas() -> list[dict]:
    """One start of 4 replicas runs every in-process check (set-up costs seconds per start)."""
    from moco_xla.config import load_config
    res = run_replicas(xla_fns.everything, N, load_config("tiny"), PER, STEPS)
    print({k: round(v, 1) for k, v in res[0].items() if k.endswith("_s")}, res[0]["train"]["compiles"])
    return res


@pytest.fixture
def collectives(replicas):
    return [r["collectives"] for r in replicas]


def test_broadcast_keeps_shape_and_dtype_of_0dim_int64_and_float_buffers(collectives):
    rank0 = collectives[0]
    assert rank0["bn"]["num_batches_tracked"].shape == () and rank0["bn"]["num_batches_tracked"].dtype == torch.int64
    for r in collectives:
        assert torch.equal(r["bn"]["num_batches_tracked"], torch.tensor(5))  # rank 0's, still 0-dim
        assert torch.equal(r["bn"]["running_mean"], torch.arange(4.0))
        assert torch.equal(r["bn_weight"], torch.full((4,), 2.0))
        assert torch.equal(r["drift_var"], torch.ones(3))  # BN statistics synced to rank 0's
        assert torch.equal(r["bcast_int"], torch.arange(3) * 2) and r["bcast_int"].dtype == torch.int64
        assert torch.equal(r["bcast_0d"], torch.tensor(7)) and r["bcast_0d"].shape == ()


def test_all_gather_all_reduce_all_to_all_per_rank(collectives):
    assert len(collectives) == N
    dist_fns.assert_collectives(collectives)  # the same per-rank results as on gloo


def test_shuffle_bn_keys_equal_single_process_reference_in_both_modes(replicas):
    per = PER
    res = [r["shuffle"] for r in replicas]
    enc = dist_fns.tiny_encoder()
    x_all = dist_fns.global_batch(N, per)
    # gather: one permutation agreed through the broadcast; BN per slice of the permuted batch
    perm = res[0]["gather"]["perm"]
    assert all(torch.equal(r["gather"]["perm"], perm) for r in res)
    assert not torch.equal(perm, torch.arange(N * per))
    with torch.no_grad():
        ref = torch.cat([enc(x_all[perm][s * per:(s + 1) * per]) for s in range(N)])[torch.argsort(perm)]
    for rank, r in enumerate(res):
        torch.testing.assert_close(r["gather"]["keys"], ref[rank * per:(rank + 1) * per], rtol=1e-4, atol=1e-5)
    # all_to_all: replica j's BN batch is chunk j of every replica's locally permuted batch
    chunk = per // N
    permuted = [x_all[i * per:(i + 1) * per][res[i]["all_to_all"]["perm"]] for i in range(N)]
    with torch.no_grad():
        enc_out = [enc(torch.cat([permuted[i][j * chunk:(j + 1) * chunk] for i in range(N)])) for j in range(N)]
    for i, r in enumerate(res):
        back = torch.cat([enc_out[j][i * chunk:(i + 1) * chunk] for j in range(N)])
        torch.testing.assert_close(r["all_to_all"]["keys"], back[torch.argsort(r["all_to_all"]["perm"])],
                                   rtol=1e-4, atol=1e-5)
        for mode in ("gather", "all_to_all"):
            assert torch.equal(r[mode]["back"], r["x"])  # shuffle then unshuffle is the identity
        assert (r["plain"] - r["gather"]["keys"]).abs().max() > 1e-2  # per-replica BN differs


def test_encoders_identical_on_every_replica_and_no_recompilation(replicas, tiny_cfg):
    res = [r["train"] for r in replicas]
    for r in res[1:]:
        for name in ("q", "k"):
            for a, b in zip(res[0][name], r[name]):
                assert torch.equal(a, b), name
        assert torch.equal(r["queue"], res[0]["queue"]) and torch.equal(r["ptr"], res[0]["ptr"])
        assert r["graph"] == res[0]["graph"]  # the same lowered step on every replica
    assert int(res[0]["ptr"]) == STEPS * tiny_cfg.train.batch_size * 2 % tiny_cfg.moco.K  # symmetric: 2 keys each
    compiles = res[0]["compiles"]
    assert compiles[-1] == compiles[2], compiles  # steps 4-6 compile nothing (process-wide counter)
    convolutions = [p for p in res[0]["products"]["default"] if p.startswith("convolution")]
    assert convolutions and all(p.startswith("convolution bf16[") for p in convolutions)  # auto: bf16, as on TPU
    # training moved the weights away from the (broadcast) initialisation on every replica alike
    init = run_init_q(tiny_cfg)
    assert any(not torch.allclose(a, b) for a, b in zip(init, res[0]["q"]))
    # each replica's BN tracked its own batches: their running statistics differ before any sync
    assert any(not torch.equal(a, b) for a, b in zip(res[0]["bn_mean"], res[1]["bn_mean"]))


def assert_no_64_bit_collectives(graphs: dict[str, list[str]]) -> None:
    """Every graph has collectives, none with an s64/u64 operand (TPUs emulate 64-bit integers)."""
    for name, ops in graphs.items():
        assert ops, name  # the graph was captured with its collectives: the check below means something
        wide = [op for op in ops if "s64[" in op or "u64[" in op]
        assert not wide, (name, wide)


def test_no_64_bit_integers_in_any_collective(replicas):
    """Start-up sync (queue_ptr, num_batches_tracked), training step, BN sync before kNN and
    checkpoints, the kNN bank's label gather and its score: integers cross replicas as s32."""
    for r in replicas:
        graphs = {"start-up sync": r["train"]["startup_collectives"],
                  "training step": r["train"]["step_collectives"], **r["knn"]["collectives"]}
        assert_no_64_bit_collectives(graphs)
        assert any("s32[" in op for op in graphs["start-up sync"])  # the int64 buffers, carried in 32 bits
        assert any("s32[" in op for op in graphs["kNN bank gather"])  # the labels


def test_logits_and_knn_similarity_at_highest_precision_encoders_not(replicas, tiny_cfg):
    """On a TPU the default precision rounds fp32 matmul operands to bf16: q @ queue (forward and
    its gradient) and the kNN similarity carry operand_precision={highest,highest}; nothing else."""
    K, per = tiny_cfg.moco.K, PER
    for r in replicas:
        step = r["train"]["products"]
        assert step["highest"].count(f"dot f32[{per},{K}]") == 2, step  # q @ queue, both symmetric halves
        assert len(step["highest"]) == 4, step  # + d(loss)/dq of each
        assert all("convolution" in p or "dot" in p for p in step["default"])
        assert any("convolution" in p for p in step["default"])  # the encoders keep the default
        for sim in r["knn"]["similarity_products"]:  # one per test batch
            assert len(sim["highest"]) == 1 and sim["highest"][0].startswith("dot f32["), sim
            assert any("convolution" in p for p in sim["default"])  # the embedding's convolutions
        assert r["knn"]["similarity_products"]


def run_init_q(cfg) -> list[torch.Tensor]:
    from moco_xla.runtime import make_runtime
    from moco_xla.train import build_model
    cfg = copy.deepcopy(cfg)
    cfg.train.seed = 0
    return [p.detach() for p in build_model(cfg, make_runtime("local")).encoder_q.parameters()]


def test_knn_on_4_replicas_equals_one_replica(replicas, tiny_cfg):
    from moco_xla import data
    from moco_xla.eval.knn import embed, knn_accuracy
    from moco_xla.models import build_encoder
    from moco_xla.runtime import make_runtime
    res = [r["knn"] for r in replicas]
    net = build_encoder(tiny_cfg.model).backbone
    net.load_state_dict(res[0]["state"])  # rank 0's statistics, which every replica took
    rt, e, bundle = make_runtime("local"), tiny_cfg.eval, data.build(tiny_cfg)
    bank, labels = embed(rt, net.eval(), bundle.bank, e.batch_size, e.max_bank)
    top1 = float(knn_accuracy(rt, net, bundle.bank, bundle.test, bundle.num_classes, e.knn_k, e.knn_t,
                              e.batch_size, e.max_bank))
    for r in res:
        assert torch.equal(r["labels"], labels)  # the gathered bank is in dataset order
        torch.testing.assert_close(r["bank"], bank, rtol=1e-4, atol=1e-5)
        assert r["top1"] == pytest.approx(r["top1_alone"], abs=1e-4)  # N replicas score what one does
        assert abs(r["top1"] - top1) <= 3 * 100.0 / len(bundle.test), (r["top1"], top1)  # XLA vs eager CPU
    # before the sync each replica embedded its share with its own statistics: another bank
    assert (res[0]["drifted"] - bank).abs().max() > 1e-3


def test_label_propagation_on_4_replicas_equals_one_process(replicas):
    """The few-label study's propagation: the gathered pixel bank, graph and labels the same on every replica,
    and what one eager CPU process computes (up to near-ties of XLA's float order)."""
    from eval_fns import study_propagation
    from moco_xla.runtime import make_runtime
    res = [r["labelprop"] for r in replicas]
    eager = study_propagation(make_runtime("local"))
    for r in res:
        assert torch.equal(r["labels"], res[0]["labels"]) and r["seeds_kept"]
        assert (r["labels"] != eager["labels"]).sum() <= 2
        assert torch.equal(r["joined"], res[0]["joined"]) and (r["joined"] != eager["joined"]).sum() <= 2
    assert eager["accuracy"] > 80.0
