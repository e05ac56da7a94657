"""The query encoder's weights averaged over the last epochs of a run (``train.average_from``).

Stochastic weight averaging (Izmailov et al. 2018, torch.optim.swa_utils.AveragedModel's default):
the uniform mean of the encoder's weights at the ends of epochs ``average_from`` .. ``epochs``.
Where the key encoder is an exponential average of every step since the initialisation, this one
holds only the epochs it is asked for, and the kNN can read it (``eval.knn_encoder: averaged``).

AveragedModel itself reads its count on the host (``if self.n_averaged == 0``) and weights each
update by a Python number, a new constant in every epoch's graph (an XLA recompilation each time);
here the count and the weight stay device tensors, as moco.py keeps the queue pointer, so every
update is the same graph. BN's running statistics are averaged with the weights (AveragedModel's
``use_buffers=True``); the integer batch counters are copied.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class WeightAverage(nn.Module):
    """``encoder``: a copy of the averaged module; ``n_averaged``: how many epochs it holds (0: none yet)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(module)
        for p in self.encoder.parameters():
            p.requires_grad = False  # trained by nothing: the average follows the query encoder
        self.register_buffer("n_averaged", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """avg <- avg + (w - avg) / (n + 1) for every weight and floating buffer of ``module``."""
        weight = 1.0 / (self.n_averaged + 1).to(torch.float32)
        for avg, current in zip(self._tensors(self.encoder), self._tensors(module)):
            if avg.is_floating_point():
                avg.add_((current.detach().to(avg.dtype) - avg) * weight.to(avg.dtype))
            else:
                avg.copy_(current)
        self.n_averaged += 1

    @staticmethod
    def _tensors(module: nn.Module) -> list[torch.Tensor]:
        return [*module.parameters(), *module.buffers()]
