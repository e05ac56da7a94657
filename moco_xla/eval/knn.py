"""Weighted kNN monitor (the official MoCo CIFAR-10 demo's feature-bank kNN), split across replicas.

Each replica embeds its share of the train set; features and labels are gathered
through the Runtime into one bank in dataset order, so N replicas score exactly
what one replica would. Each replica then scores its share of the test set and
the correct counts are summed. Everything stays on the device until the caller
reads the one accuracy number.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import eval_loader, gathered_order
from ..runtime import Runtime
from .precise_bn import precise_bn


def knn_predict(feature: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, classes: int,
                k: int, t: float, matmul=torch.matmul) -> torch.Tensor:
    """Class scores [B, classes]: the top-k neighbours vote with weight exp(sim / t).

    ``feature`` [B, D] and ``bank`` [N, D] are L2-normalised; labels are [N].
    """
    sim = matmul(feature, bank.t())  # Runtime.precise_matmul: highest precision on a TPU
    sim_weight, sim_idx = sim.topk(k=min(k, bank.shape[0]), dim=-1)
    sim_labels = bank_labels[sim_idx]
    weight = (sim_weight / t).exp()
    one_hot = F.one_hot(sim_labels, classes).to(weight.dtype)
    return (one_hot * weight.unsqueeze(-1)).sum(dim=1)


@torch.no_grad()
def embed(rt: Runtime, net: nn.Module, ds, batch: int, limit: int = 0, workers: int = 0, normalize: bool = True
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (L2-normalised unless ``normalize`` is False) and labels of ``ds`` (first ``limit``
    samples), gathered, in dataset order."""
    n = min(len(ds), limit) if limit else len(ds)
    feats, labels = [], []
    for x, y, _valid in rt.device_loader(eval_loader(ds, batch, rt.rank, rt.world_size, workers, n)):
        feats.append(net(x).float())
        labels.append(y)
    order = gathered_order(n, rt.world_size, batch).to(rt.device)
    feats = rt.all_gather(torch.cat(feats)).index_select(0, order)
    labels = rt.all_gather(torch.cat(labels)).index_select(0, order)
    return (F.normalize(feats, dim=1) if normalize else feats), labels


@torch.no_grad()
def knn_accuracy(rt: Runtime, net: nn.Module, bank_ds, test_ds, classes: int, k: int = 200,
                 t: float = 0.1, batch: int = 256, max_bank: int = 0, workers: int = 0,
                 bn: str = "running", centre: bool = False) -> torch.Tensor:
    """Top-1 kNN accuracy (percent) on ``test_ds`` with ``bank_ds`` as the memory bank.

    ``net`` maps images to features (the backbone); ``bn`` (eval.knn_bn) "recompute" first
    recomputes its BN statistics on the bank's images (precise_bn). ``centre`` (eval.knn_centre)
    subtracts the bank's mean feature from every feature before the L2 normalisation, as the
    raw-pixel reference does to the pixels (pixel_knn). Returns a device scalar.
    """
    was_training = net.training
    with precise_bn(rt, net, bank_ds, batch, workers, max_bank, enabled=bn == "recompute"):
        net.eval()
        bank, bank_labels = embed(rt, net, bank_ds, batch, max_bank, workers, normalize=False)
        mean = bank.mean(dim=0) if centre else bank.new_zeros(())
        bank = F.normalize(bank - mean, dim=1)
        correct = torch.zeros((), device=rt.device)
        for x, y, valid in rt.device_loader(eval_loader(test_ds, batch, rt.rank, rt.world_size, workers)):
            f = F.normalize(net(x).float() - mean, dim=1)
            pred = knn_predict(f, bank, bank_labels, classes, k, t, rt.precise_matmul).argmax(dim=1)
            correct = correct + ((pred == y) & valid).sum()
    net.train(was_training)
    return rt.all_reduce(correct, op="sum") * (100.0 / len(test_ds))
