"""Precise BN (eval.knn_bn=recompute): the kNN's BN statistics are those of the bank's full batches,
averaged over replicas, and pre-training's statistics are back afterwards."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import run_gloo
from eval_fns import Points, clusters, precise_bn_on_points
from moco_xla.errors import UserError
from moco_xla.eval.knn import knn_accuracy
from moco_xla.eval.precise_bn import precise_bn
from moco_xla.models import SplitBatchNorm
from moco_xla.runtime import make_runtime


def _images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 3, 3, generator=g) * torch.tensor([1.0, 3.0]).view(1, 2, 1, 1) + 5
    return x, torch.arange(n) % 2


def test_statistics_are_the_full_batches_ones_and_restored_afterwards():
    x, y = _images(50)  # batch 16: three full batches, the padded fourth is left out
    bn = SplitBatchNorm(2, num_splits=4)
    bn.running_mean.fill_(-7.0)
    bn.num_batches_tracked.fill_(11)
    batches = x[:48].split(16)
    mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    var = torch.stack([b.transpose(0, 1).reshape(2, -1).var(dim=1) for b in batches]).mean(0)  # unbiased
    with precise_bn(make_runtime("local"), bn, Points(x, y), batch=16) as net:
        assert net is bn and not bn.training
        torch.testing.assert_close(bn.running_mean, mean)
        torch.testing.assert_close(bn.running_var, var)
    assert bn.training and bn.num_splits == 4 and bn.momentum == 0.1
    assert torch.equal(bn.running_mean, torch.full((2,), -7.0)) and torch.equal(bn.running_var, torch.ones(2))
    assert int(bn.num_batches_tracked) == 11


def test_knn_reads_the_bank_statistics_not_stale_running_ones():
    """Stale running statistics that blow up eight noise features drown the clusters; recomputed on
    the bank they put every feature on one scale and the clusters are found again (and the stale
    statistics are kept for training)."""
    def with_noise(points, seed):
        x, y = points
        noise = 0.05 * torch.randn(len(y), 8, generator=torch.Generator().manual_seed(seed))
        return torch.cat([x, noise], dim=1), y
    bank, test = with_noise(clusters(120, 4, 8, seed=5), 0), with_noise(clusters(60, 4, 8, seed=6), 1)
    net = nn.BatchNorm1d(16)
    net.running_var[8:] = 1e-6  # the noise features scaled up about 300-fold
    net.eval()
    stale_var = net.running_var.clone()
    rt = make_runtime("local")
    args = (Points(*bank), Points(*test), 4)
    stale = float(knn_accuracy(rt, net, *args, k=10, batch=32))
    recomputed = float(knn_accuracy(rt, net, *args, k=10, batch=32, bn="recompute"))
    assert stale < 50.0 and recomputed > 95.0
    assert torch.equal(net.running_var, stale_var) and not net.training


def test_two_gloo_replicas_average_their_shares():
    x = torch.randn(70, 3, generator=torch.Generator().manual_seed(7)) * 2 + 1
    y = torch.zeros(70, dtype=torch.long)
    results = run_gloo(precise_bn_on_points, 2, x, y, 8)
    # replica r reads samples r, r + 2, ...: 35 each, four full batches of 8
    batches = [x[r::2][:32][i * 8:(i + 1) * 8] for r in range(2) for i in range(4)]
    mean = torch.stack([b.mean(0) for b in batches]).mean(0)
    var = torch.stack([b.var(0) for b in batches]).mean(0)
    for r in results:
        torch.testing.assert_close(r["mean"], mean)
        torch.testing.assert_close(r["var"], var)


def test_a_bank_too_small_for_the_replicas_is_a_user_error():
    bn = nn.BatchNorm1d(3)
    empty = Points(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(UserError, match="eval.knn_bn=recompute needs at least one bank image per replica"):
        with precise_bn(make_runtime("local"), bn, empty, batch=8):
            pass
    assert bn.momentum == 0.1 and bn.training  # restored after the failure
