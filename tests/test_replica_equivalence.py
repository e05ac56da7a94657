"""N replicas learn as one: a MoCo v2 step on 4 gloo replicas with Split BN 2 is the step of one process
with Split BN 8 on the global batch (the same BN groups, the same shuffle permutation). What remains
between a 1-replica and an N-replica run is then which images and augmentations each step draws
(docs/benchmarks.md section 8 measures that over seeds)."""
from __future__ import annotations

import torch

from conftest import run_gloo
import replica_fns

WORLD, PER = 4, 8  # a global batch of 32 in BN groups of 4 images


def test_four_replicas_with_split_bn_2_take_the_step_of_one_process_with_split_bn_8():
    from moco_xla.runtime import make_runtime
    res = run_gloo(replica_fns.v2_step, WORLD, PER, 2)
    ref = replica_fns.v2_step(make_runtime("local"), PER * WORLD, 8)
    mean_loss = torch.stack([r["loss"] for r in res]).mean()
    torch.testing.assert_close(mean_loss, ref["loss"], rtol=1e-5, atol=1e-5)
    for r in res:
        for name, g in ref["grads"].items():  # averaged over replicas = the global batch's gradient
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-3, atol=1e-5, msg=name)
        for name, w in ref["weights"].items():
            torch.testing.assert_close(r["weights"][name], w, rtol=1e-4, atol=1e-6, msg=name)
        assert int(r["ptr"]) == int(ref["ptr"]) == 2 * PER * WORLD  # both crops' keys of the global batch
        for rank in range(WORLD):  # the queue holds the same keys; replicas enqueue rank by rank
            mine, ref_k1, ref_k2 = (slice(2 * PER * rank, 2 * PER * rank + PER), slice(PER * rank, PER * (rank + 1)),
                                    slice(PER * (WORLD + rank), PER * (WORLD + rank + 1)))
            torch.testing.assert_close(r["queue"][:, mine], ref["queue"][:, ref_k1], rtol=1e-4, atol=1e-5)
            mine = slice(mine.start + PER, mine.stop + PER)
            torch.testing.assert_close(r["queue"][:, mine], ref["queue"][:, ref_k2], rtol=1e-4, atol=1e-5)
    for name, stat in ref["running"].items():  # what the BN sync before a kNN averages
        if stat.is_floating_point():
            torch.testing.assert_close(torch.stack([r["running"][name] for r in res]).mean(0), stat,
                                       rtol=1e-4, atol=1e-6, msg=name)
    # not trivially equal: with BN groups of 8 (Split BN 1 on each replica) the step is another one
    other = run_gloo(replica_fns.v2_step, WORLD, PER, 1)
    name = next(iter(ref["grads"]))
    assert (torch.stack([r["grads"][name] for r in other]).mean(0) - ref["grads"][name]).abs().max() > 1e-4
