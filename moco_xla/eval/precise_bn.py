"""Precise BN: BatchNorm statistics recomputed on the clean images a kNN reads (``eval.knn_bn``).

A pre-trained encoder's running statistics are an exponential average over the last few dozen
training steps: of augmented views, in Split BN's small sub-batches, while the weights still
moved. The kNN then embeds clean images with the final weights. Recomputing the statistics on
the bank's clean images with the final weights (Wu & Johnson 2021, "Rethinking 'Batch' in
BatchNorm": precise BN; what ``torch.optim.swa_utils.update_bn`` does after SWA) gives the
kNN the statistics of what it reads. No label is read, and no test image.

XLA-friendly: each full batch's statistics (momentum 1.0, a constant: no recompilation) are
summed on the device, one division and one all_reduce at the end, no host read. Only full
batches count: eval_loader pads the last one, and padding would bias the statistics.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..data import eval_loader
from ..errors import UserError
from ..models import SplitBatchNorm
from ..runtime import Runtime


@contextmanager
def precise_bn(rt: Runtime, net: nn.Module, ds, batch: int, workers: int = 0, limit: int = 0,
               enabled: bool = True) -> Iterator[nn.Module]:
    """``net`` with its BatchNorm running statistics recomputed on ``ds`` (its first ``limit``
    images) for the ``with`` block, then restored: training, checkpoints and exports keep
    pre-training's statistics."""
    bns = [m for m in net.modules() if isinstance(m, _BatchNorm)] if enabled else []
    if not bns:  # disabled, or no BN (MoCo v3's ViTs)
        yield net
        return
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(),
              getattr(m, "num_splits", None)) for m in bns]
    was_training = net.training
    try:
        recompute(rt, net, bns, ds, batch, workers, limit)
        yield net.eval()
    finally:
        for m, (momentum, mean, var, tracked, splits) in zip(bns, saved):
            m.momentum = momentum
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(tracked)
            if splits is not None:
                m.num_splits = splits
        net.train(was_training)


@torch.no_grad()
def recompute(rt: Runtime, net: nn.Module, bns: list[_BatchNorm], ds, batch: int, workers: int = 0,
              limit: int = 0) -> None:
    """Running statistics of every layer in ``bns``: the mean over full batches of ``ds`` of each
    batch's statistics (training-mode forward, the whole batch as one BN batch), averaged over
    replicas (each reads its own share)."""
    per_replica = (min(len(ds), limit) if limit else len(ds)) // rt.world_size
    batch = max(1, min(batch, per_replica))
    steps = per_replica // batch
    if steps == 0:
        raise UserError(f"eval.knn_bn=recompute needs at least one bank image per replica, got {len(ds)} for "
                        f"{rt.world_size} replicas; valid: running, or fewer replicas")
    for m in bns:
        m.momentum = 1.0  # running statistics := this batch's
        if isinstance(m, SplitBatchNorm):
            m.num_splits = 1  # one BN batch: the kNN's images are not split across devices
    sums = [torch.zeros_like(s) for s in _stats(bns)]
    net.train()
    loader = eval_loader(ds, batch, rt.rank, rt.world_size, workers, limit=steps * batch * rt.world_size)
    for x, _label, _valid in rt.device_loader(loader):
        net(x)
        for total, stat in zip(sums, _stats(bns)):
            total.add_(stat)
    for stat, total in zip(_stats(bns), sums):
        stat.copy_(rt.all_reduce(total, op="sum") / (steps * rt.world_size))


def _stats(bns: list[_BatchNorm]) -> list[torch.Tensor]:
    return [s for m in bns for s in (m.running_mean, m.running_var)]
