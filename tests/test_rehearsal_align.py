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
