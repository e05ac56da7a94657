"""The few-label study's images: which are labelled, which it may use unlabelled, how each row sees them.

``semisup_split`` draws (or reads) the labelled images and the set scored on (the test set, or
held-out training images with eval.semisup.holdout); the views give distillation and label
propagation students their (pool, labelled) datasets; ``propagated_labels`` spreads the labels over
a kNN graph of the pool. The batch helpers cap each global batch at its set and round it to the
replicas.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from .. import data
from ..config import Config
from ..data.subsets import (Relabelled, balanced_subset, clean_and_augmented, holdout_indices, read_labels_file,
                            subset, train_labels, with_transform)
from ..data.transforms import pretrain_transform
from ..runtime import Runtime
from .knn import embed
from .labelprop import propagate


@dataclass
class SemisupSplit:
    """Which training images the study labels, which it may use unlabelled, and what it scores on."""

    picked: torch.Tensor      # labelled train indices
    labels: torch.Tensor      # their labels (the dataset's, or the labels file's)
    pool: torch.Tensor        # train indices distillation may use (labelled ones included)
    test: Any                 # the test set, or held-out training images (eval.semisup.holdout)
    scored_on: str


def semisup_labels(cfg: Config, bank, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, labels): the labels file's, else a balanced seeded draw of eval.semisup.labels."""
    s = cfg.eval.semisup
    if s.labels_file:
        return read_labels_file(s.labels_file, bank, classes, cfg.data.root)
    picked = balanced_subset(train_labels(bank), s.labels, classes, s.seed)
    return picked, train_labels(bank)[picked]


def semisup_split(cfg: Config, bundle: data.DataBundle) -> SemisupSplit:
    s = cfg.eval.semisup
    picked, labels = semisup_labels(cfg, bundle.bank, bundle.num_classes)
    n = len(bundle.bank)
    if not s.holdout:
        return SemisupSplit(picked, labels, torch.arange(n), bundle.test, "test")
    held = holdout_indices(n, picked, s.holdout, s.seed + 1000)
    keep = torch.ones(n, dtype=torch.bool)
    keep[held] = False
    return SemisupSplit(picked, labels, keep.nonzero().flatten(), subset(bundle.bank, held),
                        f"holdout ({s.holdout} unlabelled training images)")


def student_images(cfg: Config, bank, images, augment: str):
    """A student's view of the training images: fine-tuning's (``images``; ``augment`` crop) or the
    checkpoint's MoCo augmentation (pretrain); eval.semisup.distill.student_augment chooses for the
    teachers' students, eval.semisup.labelprop.(pixel_)student_augment for label propagation's."""
    if augment == "crop":
        return images
    return with_transform(bank, pretrain_transform(cfg.data.augment, cfg.data.image_size, cfg.model.in_channels,
                                                   cfg.data.crop_min_scale))


def distill_views(cfg: Config, bank, noised, split: SemisupSplit) -> tuple[Dataset, Dataset]:
    """The distillation's (pool, labelled) datasets, the student seeing ``noised`` (student_images);
    the pool yields (teacher's view, student's view) pairs when the teacher sees the clean image."""
    pool = noised  # teacher_view crop: the teacher sees the student's view (SimCLRv2)
    if cfg.eval.semisup.distill.teacher_view == "clean" and noised is not bank:
        pool = clean_and_augmented(bank, noised.transform)
    return subset(pool, split.pool), Relabelled(noised, split.picked, split.labels)


def propagated_views(cfg: Config, bank, images, split: SemisupSplit, propagated: torch.Tensor, augment: str
                     ) -> tuple[Dataset, Dataset]:
    """A label-propagation student's (pool, labelled) datasets: the pool with its ``propagated`` labels
    and the labelled images with theirs, both seen as ``augment`` says (student_images)."""
    seen = student_images(cfg, bank, images, augment)
    return Relabelled(seen, split.pool, propagated), Relabelled(seen, split.picked, split.labels)


def propagated_labels(rt: Runtime, features: nn.Module, bank, split: SemisupSplit, classes: int, k: int,
                      cfg: Config, feats: torch.Tensor | None = None) -> torch.Tensor:
    """Labels for every image of split.pool (host tensor): the labelled ones spread by label propagation
    over ``features``' kNN graph of the pool (clean images; the bank gathered on every replica);
    ``feats``: the pool's features when already computed (pool_features)."""
    lp = cfg.eval.semisup.labelprop
    feats = pool_features(rt, features, bank, split, cfg) if feats is None else feats
    seeds = torch.searchsorted(split.pool, split.picked).to(rt.device)  # pool is sorted, holds the labelled
    labels = propagate(feats, seeds, split.labels.to(rt.device), classes, k, lp.alpha, lp.iterations, lp.gamma,
                       rt.mark_step)
    return labels.cpu()  # once per row, before its student trains


def pool_features(rt: Runtime, features: nn.Module, bank, split: SemisupSplit, cfg: Config) -> torch.Tensor:
    """``features`` of every image of split.pool (clean images), gathered on every replica."""
    feats, _ = embed(rt, features.to(rt.device).eval(), subset(bank, split.pool), cfg.eval.batch_size, 0,
                     cfg.data.workers)
    return feats


def summary_key(cfg: Config) -> str:
    """Studies scored on held-out training images are kept apart from those scored on the test set."""
    return "semisup_holdout" if cfg.eval.semisup.holdout else "semisup"


def semisup_batch(cfg: Config, world: int) -> int:
    """The global batch of the few-label rows: at most the labelled set, a multiple of the replicas."""
    s = cfg.eval.semisup
    return round_to_replicas(s.batch_size, s.labels, world)


def round_to_replicas(batch: int, cap: int, world: int) -> int:
    """``batch`` capped at ``cap`` and rounded down to a multiple of the ``world`` replicas."""
    return min(batch, cap) // world * world


def distill_batch(cfg: Config, world: int, pool: int) -> int:
    """The global batch of images from the whole train set: at most the pool, a multiple of the replicas."""
    return round_to_replicas(cfg.eval.semisup.distill.batch_size, pool, world)


def label_batch(distill_label_batch: int, batch: int, world: int) -> int:
    """The distillation's labelled batch: at most the rows' ``batch``, a multiple of the replicas (one each at
    least)."""
    return max(world, round_to_replicas(distill_label_batch, batch, world))
