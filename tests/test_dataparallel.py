"""Data parallelism on 4 real gloo replicas: same start, averaged gradients, identical encoders."""
from __future__ import annotations

import torch

from conftest import run_gloo
import dist_fns


def test_encoders_stay_identical_across_replicas(tiny_cfg):
    tiny_cfg.train.batch_size = 32  # 8 per replica, divisible by bn_splits=2
    res = run_gloo(dist_fns.train_steps, 4, tiny_cfg, 3)
    for r in res[1:]:
        for a, b in zip(res[0]["q"], r["q"]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        for a, b in zip(res[0]["k"], r["k"]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        torch.testing.assert_close(res[0]["queue"], r["queue"], rtol=0, atol=1e-6)
    # the queue received the global batch each step (both crops): 3 steps x 2 x 32 keys
    assert int(res[0]["ptr"]) == (3 * 2 * 32) % tiny_cfg.moco.K
    # training moved the weights away from the start
    from moco_xla.train import build_model
    from moco_xla.runtime import make_runtime
    tiny_cfg.train.seed = 0
    start = build_model(tiny_cfg, make_runtime("local"))
    moved = max((a - b).abs().max() for a, b in zip(start.encoder_q.parameters(), res[0]["q"]))
    assert moved > 1e-4


def test_grad_scaler_step_is_skipped_on_every_replica():
    """The fp16 path: gradients are averaged while still scaled, so an overflow on one replica
    reaches all of them and every replica skips the step and halves its scale together."""
    res = run_gloo(dist_fns.scaled_steps, 2)
    for r in res:
        # a finite step through the scaler equals the plain step (power-of-two scale: exact)
        torch.testing.assert_close(r["scaled"][0], r["plain"][0], rtol=0, atol=1e-7)
        assert torch.equal(r["scaled"][1], r["scaled"][0])  # the overflow step changed nothing
        assert torch.isfinite(r["scaled"][2]).all() and not torch.equal(r["scaled"][2], r["scaled"][1])
        assert r["scale"] == 2.0 ** 9
    for a, b in zip(res[0]["scaled"], res[1]["scaled"]):
        assert torch.equal(a, b)  # the replicas never part ways
    assert not torch.equal(res[0]["plain"][0], res[0]["plain"][1])
