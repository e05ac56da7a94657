"""XLA:CPU aborts a process whose replica waits too long in a collective (a warning after 5 s, the
abort 10 s later). The rehearsal therefore
aligns the replica threads at every mark_step: a replica that arrives late (starting its DataLoader
workers, loading a checkpoint) makes the others wait in Python, and the run goes on."""
from __future__ import annotations

import pytest
import torch

import xla_fns
from xla_replicas import run_replicas

pytestmark = pytest.mark.needs_xla

LATE_S = 20.0  # beyond XLA:CPU's 15 s: without the alignment this run aborts


def test_a_replica_20_s_late_to_a_collective_does_not_abort_the_others():
    res = run_replicas(xla_fns.late_replica, 4, LATE_S)
    for r in res:
        assert torch.equal(r["sum"], torch.full((3,), 1.0 + 2 + 3 + 4))
    assert min(r["waited_s"] for r in res[:-1]) > LATE_S - 2  # the punctual replicas waited, in Python


def test_each_replica_thread_counts_the_compilations_it_launched():
    """torch_xla counts compilations per process; a replica that reaches a new graph after another
    must not be charged with (or miss) it: the graph check's race that counted a compilation after
    warm-up in a clean 4-replica run."""
    res = run_replicas(xla_fns.credited_compiles, 4, 3.0)
    assert all(r["value"] == 7 * 5.0 for r in res)
    assert sum(r["own"] for r in res) == 1 and res[0]["own"] == 0  # compiled once, by a punctual replica
    for r in res:
        assert r["report"]["compiles_after_warmup"] == 0, r["report"]["violations"]
        assert r["report"]["region_compiles"].get("train", []) == []
    merged = res[0]["report"]  # replica 0's report adds up every replica thread's
    assert merged["region_compiles"]["epoch_end"] == [1]
    assert merged["compiles"] == res[0]["process"] >= 2  # the region's graph and the barrier's, all counted
