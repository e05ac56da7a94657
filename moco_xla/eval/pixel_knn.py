"""The raw-pixel reference for the kNN monitor: the same weighted kNN on the centred pixels.

A pre-trained encoder is worth its compute only if its features classify better than
the input itself. ``pixel_knn_accuracy`` scores the monitor's protocol (same bank, same
test set, same k and T) on each image's pixels, flattened, minus the bank's mean image
and L2-normalised, so every run prints whether pre-training has learned more than the
pixels. The monitor reads the images as stored where the run upsamples them (the digits' 8x8
at image_size 16): interpolation only blurs them. Images larger than ``MAX_SIDE`` are
area-averaged down to it first, which keeps the bank (N x C x side^2 floats) as small as a
ResNet-50's feature bank on ImageNet.

Everything runs on the device with static shapes: ``knn_accuracy`` with the pixels as the
network and its ``centre`` on (the bank's mean image subtracted before the L2 normalisation).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.subsets import at_stored_size
from .knn import knn_accuracy
from ..runtime import Runtime

MAX_SIDE = 32  # larger images are area-averaged to 32 x 32 before the kNN


class Pixels(nn.Module):
    """Image [B, C, H, W] -> its flattened pixels (area-averaged to at most ``MAX_SIDE`` a side)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if max(x.shape[-2:]) > MAX_SIDE:
            x = F.adaptive_avg_pool2d(x, (min(x.shape[-2], MAX_SIDE), min(x.shape[-1], MAX_SIDE)))
        return x.flatten(1)


@torch.no_grad()
def pixel_knn_accuracy(rt: Runtime, bank_ds, test_ds, classes: int, k: int = 200, t: float = 0.1,
                       batch: int = 256, max_bank: int = 0, workers: int = 0) -> torch.Tensor:
    """Top-1 weighted kNN (percent) on centred, L2-normalised raw pixels: ``knn_accuracy``'s protocol
    and arguments with the pixels as the features. Returns a device scalar."""
    return knn_accuracy(rt, Pixels(), bank_ds, test_ds, classes, k, t, batch, max_bank, workers, centre=True)


class PixelReference:
    """The training monitor's raw-pixel kNN: on the images as stored where the run upsamples them
    (``data.subsets.at_stored_size``), measured at the run's first kNN, then reused (the pixels do
    not change during training)."""

    def __init__(self, rt: Runtime, bundle, cfg) -> None:
        self.rt, self.bundle, self.cfg = rt, bundle, cfg
        self.top1: float | None = None

    def measure(self) -> float:
        if self.top1 is None:
            e, d, b = self.cfg.eval, self.cfg.data, self.bundle
            bank, test = (at_stored_size(ds, d.augment, d.image_size, self.cfg.model.in_channels)
                          for ds in (b.bank, b.test))
            self.top1 = float(pixel_knn_accuracy(self.rt, bank, test, b.num_classes, e.knn_k, e.knn_t,
                                                 e.batch_size, e.max_bank, d.workers))
        return self.top1
