"""What happens to a sample that cannot be used (undecodable image, missing or bad label, truncated shard).

``data.on_bad_sample=error`` (default) stops the run with one line naming the file
or shard member. ``skip`` counts it, warns for the first few, and the loader puts
another sample in its place so every replica still runs the same number of
fixed-size steps (a shorter replica would leave the others waiting in a collective).

Counts live in shared memory so DataLoader worker processes add to the same
tensor the replica reads (one slot per worker: no lost updates).
"""
from __future__ import annotations

import warnings

import torch
from torch.utils.data import get_worker_info

from ..errors import UserError

MAX_SLOTS = 257  # the replica itself + up to 256 DataLoader workers
WARN_FIRST = 5


class SkipCounter:
    """Raise or count bad samples according to ``policy`` (error | skip)."""

    def __init__(self, policy: str = "error") -> None:
        if policy not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be error or skip, got {policy!r}")
        self.policy = policy
        self.counts = torch.zeros(MAX_SLOTS, dtype=torch.int64).share_memory_()
        self._warned = 0

    def bad(self, what: str, reason: str, n: int = 1) -> None:
        """Handle ``n`` unusable samples at ``what`` (a path or shard member)."""
        if self.policy == "error":
            raise UserError(f"bad sample {what}: {reason} (set data.on_bad_sample=skip to skip and count "
                            f"such samples)")
        self.counts[_slot()] += n
        self._warned += 1
        if self._warned <= WARN_FIRST:
            more = "; further bad samples are counted silently" if self._warned == WARN_FIRST else ""
            warnings.warn(f"skipping bad sample {what}: {reason}{more}", RuntimeWarning, stacklevel=2)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def __getstate__(self) -> dict:
        return {"policy": self.policy, "counts": self.counts, "_warned": 0}


def _slot() -> int:
    info = get_worker_info()
    return 0 if info is None else 1 + info.id % (MAX_SLOTS - 1)
