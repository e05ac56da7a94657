"""Shuffle BN across replicas, on real gloo process groups (4 and 8 processes)."""
from __future__ import annotations

import pytest
import torch

from conftest import run_gloo
import dist_fns


@pytest.mark.parametrize("world", [4, 8])
def test_gather_shuffle_keys_equal_single_process_reference(world):
    per = 4
    res = run_gloo(dist_fns.keys_with_shuffle, world, "gather", per)
    perm = res[0]["perm"]
    for r in res:  # one permutation, agreed on every replica through the broadcast
        assert torch.equal(r["perm"], perm)
    assert not torch.equal(perm, torch.arange(world * per))
    # Reference in one process: permute the global batch, BN per slice, un-permute.
    enc = dist_fns.tiny_encoder()
    x_all = dist_fns.global_batch(world, per)
    with torch.no_grad():
        k_shuf = torch.cat([enc(x_all[perm][s * per:(s + 1) * per]) for s in range(world)])
    ref = k_shuf[torch.argsort(perm)]
    for rank, r in enumerate(res):
        torch.testing.assert_close(r["keys"], ref[rank * per:(rank + 1) * per], rtol=1e-5, atol=1e-5)
    # Without the shuffle, each replica's BN sees only its own samples: different keys.
    plain = torch.cat([r["plain"] for r in res])
    assert (plain - ref).abs().max() > 1e-2


def test_all_to_all_shuffle_keys_equal_reference():
    world, per = 4, 8
    res = run_gloo(dist_fns.keys_with_shuffle, world, "all_to_all", per)
    enc = dist_fns.tiny_encoder()
    x_all = dist_fns.global_batch(world, per)
    chunk = per // world
    # Replica j's BN batch: chunk j of every replica's locally permuted batch, in rank order.
    permuted = [x_all[i * per:(i + 1) * per][res[i]["perm"]] for i in range(world)]
    with torch.no_grad():
        enc_out = [enc(torch.cat([permuted[i][j * chunk:(j + 1) * chunk] for i in range(world)]))
                   for j in range(world)]
    for i in range(world):
        back = torch.cat([enc_out[j][i * chunk:(i + 1) * chunk] for j in range(world)])
        ref = back[torch.argsort(res[i]["perm"])]
        torch.testing.assert_close(res[i]["keys"], ref, rtol=1e-5, atol=1e-5)
        # the BN batch mixes replicas: keys differ from per-replica BN
        assert (res[i]["plain"] - res[i]["keys"]).abs().max() > 1e-2


@pytest.mark.parametrize("mode", ["gather", "all_to_all"])
def test_shuffle_then_unshuffle_is_identity(mode):
    res = run_gloo(dist_fns.identity_roundtrip, 4, mode, 8)
    for r in res:
        assert torch.equal(r["x"], r["back"])


def test_broadcast_from_all_reduce_equals_torch_distributed_broadcast():
    res = run_gloo(dist_fns.broadcasts, 4, 2)
    for r in res:
        assert torch.equal(r["via_all_reduce"], r["native"])
        assert torch.equal(r["iface"], r["native"])
        assert torch.equal(r["native"], torch.arange(6, dtype=torch.float32) * 3)
        assert torch.equal(r["perm"], res[0]["perm"])
        assert torch.equal(r["perm"].sort().values, torch.arange(16))


def test_collectives_interface_semantics():
    res = run_gloo(dist_fns.collectives, 4)
    assert len(res) == 4
    dist_fns.assert_collectives(res)
