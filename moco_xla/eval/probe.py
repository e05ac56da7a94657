"""Linear probes on a frozen encoder: MoCo's lincls, and the raw-pixel reference.

The backbone is frozen with BN in eval mode; one linear layer (weights N(0, 0.01), bias 0) is
trained on its pooled features with SGD at a large learning rate and a step or cosine schedule,
either on features extracted once (an epoch costs a few matrix products) or, with augmentation,
through ``FrozenProbe`` on every step's crops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from .. import data
from ..runtime import Runtime
from ..schedule import SGDSpec
from .fit import Batches, fit, linear_head


@dataclass
class Features:
    """This replica's share of a dataset's frozen features: rows [0, count) are real, the rest padding."""

    x: torch.Tensor        # [per, D] on the device
    y: torch.Tensor        # [per]
    valid: torch.Tensor    # [per] bool
    count: int             # real rows on this replica
    total: int             # real rows over all replicas


@torch.no_grad()
def extract(rt: Runtime, net: nn.Module, ds, batch: int, workers: int = 0, normalize: bool = False
            ) -> Features:
    """Pooled features of ``ds`` (eval transform, optionally L2-normalised) split across replicas.

    Keeping them sharded bounds memory at 1/world of the dataset per replica
    (ImageNet: 10 GB of fp32 features in all), which a gathered bank would not.
    """
    was_training = net.training
    net.eval()
    xs, ys, vs = [], [], []
    for x, y, valid in rt.device_loader(data.eval_loader(ds, batch, rt.rank, rt.world_size, workers)):
        f = net(x).float()
        xs.append(F.normalize(f, dim=1) if normalize else f)
        ys.append(y)
        vs.append(valid)
    net.train(was_training)
    n = len(ds)
    count = len(range(rt.rank, n, rt.world_size))  # eval_loader puts the real samples first
    return Features(torch.cat(xs), torch.cat(ys), torch.cat(vs), count, n)


def feature_batches(f: Features, per: int, seed: int, device: torch.device) -> Batches:
    """Endless batches of ``per`` real rows, a fresh seeded permutation of them every pass."""
    for idx in index_stream(f.count, per, seed):
        idx = idx.to(device)  # a host-to-device copy: the graph is the same every step
        yield f.x.index_select(0, idx), f.y.index_select(0, idx)


def index_stream(n: int, per: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless [per] index batches: seeded permutations of range(n) laid end to end."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.empty(0, dtype=torch.long)
    while True:
        while len(buf) < per:
            buf = torch.cat([buf, torch.randperm(n, generator=g)])
        yield buf[:per]
        buf = buf[per:]


@torch.no_grad()
def head_accuracy(rt: Runtime, head: nn.Module, f: Features) -> torch.Tensor:
    """Top-1 (percent, device scalar) of ``head`` on features split across replicas."""
    correct = ((head(f.x).argmax(dim=1) == f.y) & f.valid).sum().float()
    return rt.all_reduce(correct, op="sum") * (100.0 / f.total)


def train_probe(rt: Runtime, train: Features, classes: int, sgd: SGDSpec, epochs: int, steps_per_epoch: int,
                batch: int, seed: int = 0,
                on_epoch: Callable[[int, float, torch.Tensor, nn.Linear], None] | None = None) -> nn.Linear:
    """A linear classifier on frozen features; ``batch`` is global."""
    head = linear_head(train.x.shape[1], classes, rt, seed)
    batches = feature_batches(train, batch // rt.world_size, seed * 1000 + rt.rank, rt.device)
    hook = None if on_epoch is None else (lambda e, lr, loss: on_epoch(e, lr, loss, head))
    fit(rt, head, list(head.parameters()), batches, epochs, steps_per_epoch, sgd, hook)
    return head


class FrozenProbe(nn.Module):
    """Frozen backbone (eval-mode BN, no gradients) + trainable linear head, for augmented probes."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, normalize: bool = False) -> None:
        super().__init__()
        self.backbone, self.head, self.normalize = backbone, head, normalize
        for p in backbone.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenProbe:
        super().train(mode)
        self.backbone.eval()  # BN keeps its pre-trained statistics
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.backbone(x).float()
            if self.normalize:
                feats = F.normalize(feats, dim=1)
        return self.head(feats)


def pixel_logistic(rt: Runtime, train_ds: Dataset, test_ds, c: float, batch: int, workers: int = 0
                   ) -> torch.Tensor:
    """Top-1 (percent, device scalar) of a logistic regression on standardised raw pixels.

    The classic "is the encoder worth it" reference. scikit-learn fits it on the host (the
    labelled set is small); each replica scores its share of the test set.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xs, ys = zip(*(train_ds[i] for i in range(len(train_ds))))
    x = torch.stack(list(xs)).flatten(1).numpy()
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
    clf.fit(x, np.asarray(ys))
    correct = 0
    for x, y, valid in data.eval_loader(test_ds, batch, rt.rank, rt.world_size, workers):
        pred = torch.from_numpy(clf.predict(x.flatten(1).numpy()))
        correct += int(((pred == y) & valid).sum())
    total = torch.tensor(float(correct), device=rt.device)
    return rt.all_reduce(total, op="sum") * (100.0 / len(test_ds))
