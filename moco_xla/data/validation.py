"""A validation split carved out of the training images (``data.val_size``), for choosing settings.

With ``data.val_size = N`` the run's "test" set becomes N training images, class-balanced
and drawn with a fixed seed; pre-training and the kNN bank use the other training images,
so recipes are chosen without ever reading the real test set (report on it once, at the end,
with ``data.val_size = 0``).
"""
from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset, Subset

from ..errors import UserError
from .subsets import train_labels

SEED = 0  # one fixed split: every trial of a recipe search is scored on the same images


def carve(train: Dataset, size: int, seed: int = SEED) -> tuple[Subset, Subset]:
    """(training images left, ``size`` validation images): a stratified seeded split of ``train``."""
    if not 0 < size < len(train):
        raise UserError(f"data.val_size={size} must be in 1..{len(train) - 1} (fewer than the {len(train)} "
                        f"training images; 0: no validation split)")
    labels = train_labels(train).numpy()
    keep, val = train_test_split(np.arange(len(train)), test_size=size, random_state=seed, stratify=labels)
    return Subset(train, np.sort(keep).tolist()), Subset(train, np.sort(val).tolist())
