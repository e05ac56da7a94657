"""Supervised training on every replica: the SGD loop, lincls's head, end-to-end classifiers.

Every trainer runs on every replica through the Runtime: each replica draws its own share of every
global batch, ``rt.optimizer_step`` averages the gradients, and losses stay on the device until a
step closure reads them once per epoch.
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from .. import data
from ..errors import UserError
from ..optim import prime_momentum
from ..runtime import Runtime
from ..schedule import SGDSpec, set_lr

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def classify_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of ``model`` on an (images, labels) batch."""
    x, y = batch
    return F.cross_entropy(model(x).float(), y)


def fit(rt: Runtime, model: nn.Module, params: list[nn.Parameter], batches: Iterator, epochs: int,
        steps_per_epoch: int, sgd: SGDSpec,
        on_epoch: Callable[[int, float, torch.Tensor], None] | None = None,
        loss_fn: Callable[[nn.Module, tuple], torch.Tensor] = classify_loss) -> None:
    """SGD on ``loss_fn(model, batch)`` for ``epochs`` x ``steps_per_epoch`` of this replica's ``batches``.

    The learning rate changes once per epoch (a Python scalar: no recompilation on XLA).
    ``on_epoch(epoch, lr, mean_loss)`` gets the epoch's mean loss as a device tensor.
    """
    optimizer = sgd.optimizer(params)
    prime_momentum(optimizer)  # step 1 runs the steady graph
    for epoch in range(epochs):
        lr = sgd.lr_at(epoch / epochs)
        set_lr(optimizer, lr)
        # host data, not a graph node; shape [1]: torch_xla folds a 0-d host zero into the graph
        loss_sum = torch.zeros(1).to(rt.device)
        for _ in range(steps_per_epoch):
            loss = loss_fn(model, next(batches))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            rt.optimizer_step(optimizer)
            loss_sum += loss.detach()  # inside the step graph
            rt.mark_step()
        if on_epoch is not None:
            on_epoch(epoch, lr, loss_sum[0] / steps_per_epoch)
            rt.mark_step()  # the epoch's report is a graph of its own, not folded into the next step's


def linear_head(dim: int, classes: int, rt: Runtime, seed: int = 0) -> nn.Linear:
    """lincls's head: weights N(0, 0.01), bias 0; the same on every replica."""
    torch.manual_seed(seed)
    head = nn.Linear(dim, classes)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    head = head.to(rt.device)
    rt.sync_module(head)
    return head


def image_batches(rt: Runtime, ds, per: int, seed: int, workers: int = 0) -> Batches:
    """Endless shuffled (image, label) batches of ``per`` from this replica's part of ``ds``, on the device."""
    if isinstance(ds, data.ShardSet):
        from ..data.streams import PretrainStream
        steps = max(1, len(ds) // (per * rt.world_size))
        stream = PretrainStream(ds, rt.rank, rt.world_size, per, steps, seed)
        loader = DataLoader(stream, batch_size=per, num_workers=workers, persistent_workers=workers > 0)
        set_epoch = stream.set_epoch
    else:
        sampler = DistributedSampler(ds, num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=seed)
        if len(sampler) < per:
            raise UserError(f"{len(ds)} images cannot fill a batch of {per} per replica")
        loader = DataLoader(ds, batch_size=per, sampler=sampler, drop_last=True, num_workers=workers,
                            persistent_workers=workers > 0)
        set_epoch = sampler.set_epoch
    for epoch in itertools.count():
        set_epoch(epoch)
        for x, y in rt.device_loader(loader):
            yield x, y


@torch.no_grad()
def image_accuracy(rt: Runtime, model: nn.Module, ds, batch: int, workers: int = 0) -> torch.Tensor:
    """Top-1 (percent, device scalar) of an image classifier on ``ds``, split across replicas."""
    model.eval()
    correct = torch.zeros((), device=rt.device)
    for x, y, valid in rt.device_loader(data.eval_loader(ds, batch, rt.rank, rt.world_size, workers)):
        correct += ((model(x).argmax(dim=1) == y) & valid).sum()
    return rt.all_reduce(correct, op="sum") * (100.0 / len(ds))


def train_classifier(rt: Runtime, backbone: nn.Module, feat_dim: int, classes: int, batches: Batches,
                     steps: int, sgd: SGDSpec, seed: int = 0,
                     on_epoch: Callable[[int, float, torch.Tensor], None] | None = None) -> nn.Module:
    """Backbone + linear head trained end to end (fine-tuning, or from scratch on a fresh backbone).

    BN runs in training mode on each replica's batch; the buffers are taken from the master
    afterwards so every replica evaluates the same model.
    """
    model = nn.Sequential(backbone.to(rt.device), linear_head(feat_dim, classes, rt, seed)).train()
    rt.sync_module(model)
    fit(rt, model, list(model.parameters()), batches, steps, 1, sgd, on_epoch)
    rt.sync_module(model)
    return model
