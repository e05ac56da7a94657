"""Datasets by name. Each builder returns (train, test, num_classes) of raw images + labels.

Images come back as PIL images or uint8 tensors; the transform (two MoCo views
for pre-training, a plain resize for evaluation) is attached by ``data.build``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UserError


class TensorImages(Dataset):
    """uint8 images [N, C, H, W] and integer labels in memory, with an optional transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i]
        return (self.transform(img) if self.transform else img), int(self.labels[i])


def load_digits(test_fraction: float = 0.3, seed: int = 0):
    """The 1,797 handwritten 8x8 digits bundled with scikit-learn, with a fixed stratified split.

    Works offline: the data ship inside scikit-learn. Pixel values 0..16 become uint8 0..255.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    d = sk_load_digits()
    images = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                           stratify=d.target, random_state=seed)
    return (TensorImages(images[idx_train], labels[idx_train]),
            TensorImages(images[idx_test], labels[idx_test]), 10)


def build_raw(data_cfg) -> tuple[Dataset, Dataset, int]:
    """(train, test, num_classes) for ``data.dataset``; raises UserError on bad names or roots."""
    name = data_cfg.dataset
    if name == "digits":
        return load_digits(data_cfg.test_fraction)
    builder = REGISTRY.get(name)
    if builder is None:
        raise UserError(f"unknown dataset {name!r}; valid: {', '.join(dataset_names())}")
    return builder(data_cfg)


# Datasets beyond the offline default register here: name -> builder(data_cfg).
REGISTRY: dict[str, Callable] = {}


def dataset_names() -> list[str]:
    return ["digits", *sorted(REGISTRY)]
