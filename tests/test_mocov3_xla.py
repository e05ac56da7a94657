"""MoCo v3 on 4 real XLA:CPU replicas (the TPU rehearsal, tests/xla_replicas.py): the same graph on
every replica, identical weights, and no compilation after warm-up while lr and momentum change
every step (LARS for the ResNet, AdamW for the ViT)."""
from __future__ import annotations

import os

import pytest
import torch

import mocov3_fns
from xla_replicas import run_replicas

pytestmark = pytest.mark.needs_xla  # XLA:CPU replicas: skipped where torch_xla is not installed

N, STEPS = 4, 6
RUNS = [("mocov3_digits", mocov3_fns.TINY + ["train.epochs=2", "train.warmup_epochs=1"]),
        ("mocov3_vit_digits", ["model.width=16", "moco.mlp_dim=32", "model.dim=8", "train.batch_size=16",
                               "train.epochs=1", "train.warmup_epochs=0"])]


@pytest.fixture(scope="module")
def replicas() -> list[dict]:
    old = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # compile fast: the graphs are what count
    try:
        return run_replicas(mocov3_fns.xla_v3_steps, N, RUNS, STEPS, timeout=600)
    finally:
        os.environ.pop("XLA_FLAGS") if old is None else os.environ.__setitem__("XLA_FLAGS", old)


@pytest.mark.parametrize("name", [name for name, _ in RUNS])
def test_v3_step_same_graph_same_weights_no_recompilation(replicas, name):
    res = [r[name] for r in replicas]
    for r in res[1:]:
        assert r["graph"] == res[0]["graph"]  # rank_index, not the rank: one program for all replicas
        for key in ("q", "k"):
            for a, b in zip(res[0][key], r[key]):
                assert torch.equal(a, b), key
    compiles = res[0]["compiles"]
    assert compiles[-1] == compiles[2], compiles  # steps 4-6 compile nothing (process-wide counter)
    lrs, ms = res[0]["lrs"], res[0]["ms"]
    assert len(set(lrs)) == STEPS and len(set(ms)) == STEPS  # both changed every step
    assert all(torch.isfinite(r["loss"]) for r in res)
    from test_xla_replicas import assert_no_64_bit_collectives
    assert_no_64_bit_collectives({f"{name} step": r["collectives"] for r in res})
    for r in res:  # the logits q @ keys.t() and the gradient to q at the highest precision
        assert len(r["products"]["highest"]) == 4, r["products"]  # two queries, forward and backward each
