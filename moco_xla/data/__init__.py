"""Input pipeline: datasets by name, MoCo two-view augmentation, per-replica loaders.

``check(cfg)`` validates the data section before any replica starts; ``build(cfg)``
gives each replica a ``DataBundle``; the training loop asks for two loaders:
- ``pretrain_loader``: batches of (view_q, view_k) with static shapes and the same
  number of steps on every replica; for the MoCo presets the views are uint8 crops and
  ``device_views(cfg)`` finishes them in the step (colour, blur, normalisation);
- ``eval_loader``: fixed-size batches of (image, label, valid) covering a dataset
  exactly once across replicas (padding is marked invalid), for kNN and probes.

A root is a local directory in the dataset's own format, or shards written by
``python -m moco_xla.shards`` (a gs://bucket/prefix, or a local directory with
train/manifest.json), streamed without downloading.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from ..errors import UserError
from . import storage
from .badsamples import SkipCounter
from .datasets import REGISTRY, build_raw, dataset_names, spec
from .loaders import EpochLoader, EvalLoader, Transformed, eval_loader, gathered_order, pretrain_loader
from .shardset import ShardSet, check_shard_root, is_shard_root
from .subsets import check_subset, slice_train
from .device_augment import DeviceAugment, identity
from .transforms import device_recipe, eval_transform, views_transform
from .validation import carve

__all__ = ["DataBundle", "EpochLoader", "EvalLoader", "REGISTRY", "ShardSet", "build", "check",
           "dataset_names", "device_views", "eval_loader", "gathered_order", "pretrain_loader", "skipped_total"]


@dataclass
class DataBundle:
    pretrain: Dataset | ShardSet   # yields ((view_q, view_k), label); uint8 [H, W, C] views: device_views finishes them
    bank: Dataset | ShardSet       # train set, eval transform: yields (image, label)
    test: Dataset | ShardSet       # test set, eval transform
    num_classes: int
    classes: list[str] = field(default_factory=list)
    skips: SkipCounter = field(default_factory=SkipCounter)

    @property
    def skipped(self) -> int:
        """Bad samples skipped so far by this replica (pre-training and evaluation)."""
        return self.skips.total


def skipped_total(rt, bundle: DataBundle) -> int:
    """Bad samples skipped by all replicas together (one all_reduce: call it once, at the end)."""
    count = torch.tensor([float(bundle.skipped)], device=rt.device)
    return int(rt.all_reduce(count, op="sum").cpu()[0])


def check(cfg) -> None:
    """UserError for what can be known before replicas start: name, root, bucket, manifests, layout."""
    d = cfg.data
    s = spec(d.dataset)
    check_subset(d, bool(d.root and is_shard_root(d.root)))
    if d.root and is_shard_root(d.root):
        check_shard_root(d)
    elif s.name == "digits":
        if d.root:
            raise UserError(f"data.root {d.root} holds no shards (train/manifest.json); digits needs no root")
    elif not d.root:
        raise UserError(f"data.dataset={d.dataset} needs data.root: a local directory ({s.layout}) or "
                        f"shards from python -m moco_xla.shards (gs://bucket/prefix or a local path)")
    else:
        s.check(d)


def build(cfg) -> DataBundle:
    """Datasets for the config's ``data`` section, with the model's channel count."""
    d, ch = cfg.data, cfg.model.in_channels
    skips = SkipCounter(d.on_bad_sample)
    pre_t = views_transform(d.augment, d.image_size, ch, d.crop_min_scale)
    eval_t = eval_transform(d.augment, d.image_size, ch)
    if d.root and is_shard_root(d.root):
        if d.val_size:
            raise UserError("data.val_size needs a local data.root (shards carry no validation split); valid: 0")
        check_subset(d, sharded=True)
        train_m, test_m = check_shard_root(d)

        def shards(m, t) -> ShardSet:
            return ShardSet(m, t, ch, d.image_size, d.shuffle_buffer, skips)
        return DataBundle(shards(train_m, pre_t), shards(train_m, eval_t), shards(test_m, eval_t),
                          len(train_m.classes), train_m.classes, skips)
    check(cfg)
    raw = build_raw(d)
    if d.val_size:  # choose settings on held-out training images, never on the test set
        raw.train, raw.test = carve(raw.train, d.val_size)
    n = len(raw.classes)
    train = slice_train(raw.train, d, n)  # data.subset
    return DataBundle(Transformed(train, pre_t, n, skips), Transformed(train, eval_t, n, skips),
                      Transformed(raw.test, eval_t, n, skips), n, raw.classes, skips)


def device_views(cfg):
    """What the training step applies to each view before the model: the colour half of the
    augmentation on the device (uint8 views in, float normalised out) for presets whose views
    the host only crops (transforms.DEVICE_PRESETS), else nothing (the host finished them)."""
    recipe = device_recipe(cfg.data.augment, cfg.data.image_size, cfg.model.in_channels)
    return identity if recipe is None else DeviceAugment(recipe)
