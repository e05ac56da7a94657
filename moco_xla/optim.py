"""Optimizer helpers shared by pre-training, evaluation and the benchmark."""
from __future__ import annotations

import torch


def prime_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Start every SGD momentum buffer at zero: the first step then runs the same graph as all others.

    SGD creates the buffers as a copy of the first gradient; 0 * m + g is that same copy
    (dampening is 0), so the numbers do not change, but on XLA it saves compiling a whole
    second step graph (minutes for a ResNet-50 on a TPU). The zeros are made on the host and
    copied: on XLA that is device data, where ``zeros_like`` on the device would be a graph
    node folded into (and so changing) the first step's graph.
    """
    for group in optimizer.param_groups:
        if group.get("momentum") and not group.get("dampening"):
            for p in group["params"]:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros(p.shape, dtype=p.dtype).to(p.device))
