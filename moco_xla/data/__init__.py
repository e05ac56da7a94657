"""Input pipeline: datasets by name, MoCo two-view augmentation, per-replica loaders.

The training loop asks for three things, all split across replicas:
- ``pretrain_loader``: batches of (view_q, view_k) with static shapes (drop_last)
  and the same number of steps on every replica;
- ``eval_loader``: fixed-size batches of (image, label, valid) covering a dataset
  exactly once across replicas (padding is marked invalid), for kNN and probes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .datasets import build_raw
from .transforms import TwoCrops, eval_transform, pretrain_transform


@dataclass
class DataBundle:
    pretrain: Dataset     # yields ((view_q, view_k), label)
    bank: Dataset         # train set, eval transform: yields (image, label)
    test: Dataset         # test set, eval transform
    num_classes: int


class _WithTransform(Dataset):
    def __init__(self, base: Dataset, transform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, label = self.base[i]
        return self.transform(img), label


def build(cfg) -> DataBundle:
    """Datasets for the config's ``data`` section, with the model's channel count."""
    d, ch = cfg.data, cfg.model.in_channels
    train, test, n_cls = build_raw(d)
    return DataBundle(
        pretrain=_WithTransform(train, TwoCrops(pretrain_transform(d.augment, d.image_size, ch))),
        bank=_WithTransform(train, eval_transform(d.augment, d.image_size, ch)),
        test=_WithTransform(test, eval_transform(d.augment, d.image_size, ch)),
        num_classes=n_cls,
    )


class EpochLoader:
    """A DataLoader over this replica's part of the data, re-shuffled by ``set_epoch``."""

    def __init__(self, loader: DataLoader, sampler: DistributedSampler | None, steps: int) -> None:
        self.loader, self.sampler, self.steps = loader, sampler, steps

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for step, batch in enumerate(self.loader):
            if step >= self.steps:
                break
            yield batch


def pretrain_loader(ds: Dataset, batch: int, rank: int, world: int, seed: int, workers: int = 0,
                    max_steps: int = 0) -> EpochLoader:
    """Shuffled (view_q, view_k) batches of ``batch`` per replica; every replica gets the same count."""
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    steps = len(sampler) // batch
    if steps == 0:
        from ..errors import UserError
        raise UserError(f"dataset has {len(ds)} images: too few for a global batch of {batch * world}")
    if max_steps:
        steps = min(steps, max_steps)
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, drop_last=True, num_workers=workers,
                        persistent_workers=workers > 0, collate_fn=_collate_views)
    return EpochLoader(loader, sampler, steps)


def _collate_views(samples):
    q = torch.stack([s[0][0] for s in samples])
    k = torch.stack([s[0][1] for s in samples])
    return q, k


class _Sharded(Dataset):
    """This replica's indices (rank, rank + world, ...), padded to a whole number of batches."""

    def __init__(self, base: Dataset, rank: int, world: int, batch: int, limit: int = 0) -> None:
        self.base = base
        n = min(len(base), limit) if limit else len(base)
        per = math.ceil(math.ceil(n / world) / batch) * batch
        self.indices = [rank + world * j for j in range(per)]
        self.n = n

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        idx = self.indices[i]
        valid = idx < self.n
        img, label = self.base[idx if valid else 0]
        return img, label if valid else -1, valid


def eval_loader(ds: Dataset, batch: int, rank: int, world: int, workers: int = 0, limit: int = 0
                ) -> DataLoader:
    """Fixed-shape batches of (image, label, valid): each sample once across replicas.

    Replica r holds samples r, r + world, ...; gathered in rank order, position
    ``r * per + j`` is sample ``r + world * j`` (see ``gathered_order``).
    """
    return DataLoader(_Sharded(ds, rank, world, batch, limit), batch_size=batch, shuffle=False,
                      num_workers=workers)


def gathered_order(n: int, world: int, batch: int) -> torch.Tensor:
    """Positions, in an all_gather of eval_loader outputs, of samples 0..n-1 in dataset order."""
    per = math.ceil(math.ceil(n / world) / batch) * batch
    idx = torch.arange(n)
    return (idx % world) * per + idx // world
