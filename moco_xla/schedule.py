"""Learning-rate schedules: one home for pre-training (per epoch, v1/v2), MoCo v3 (per step) and the
evaluation's SGD (per epoch or step of a probe, fine-tuning or distillation).

Every schedule is a warm-up (optional) followed by one of three decays: ``cosine`` (half a cosine
from the peak to 0), ``step`` (x0.1 at each milestone passed) or ``constant``. The rates are Python
floats: on XLA they reach the graph as data, so changing them recompiles nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

SCHEDULES = ("cosine", "step", "constant")


def cosine(peak: float, done: float, total: float) -> float:
    """Half a cosine from ``peak`` (done = 0) to 0 (done = total)."""
    return peak * 0.5 * (1.0 + math.cos(math.pi * done / total))


def decayed(peak: float, schedule: str, done: float, total: float, milestones_passed: int) -> float:
    """``peak`` after ``done`` of ``total`` units: cosine, step (x0.1 per milestone passed) or constant."""
    if schedule == "cosine":
        return cosine(peak, done, total)
    if schedule == "step":
        return peak * 0.1 ** milestones_passed
    return peak


def warmup(peak: float, done: int, length: int) -> float:
    """Linear warm-up step ``done`` of ``length``: peak * (done + 1) / (length + 1), never exactly 0."""
    return peak * (done + 1) / (length + 1)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------- pre-training

def lr_at_epoch(train_cfg, epoch: int) -> float:
    """MoCo v1/v2's learning rate for ``epoch`` (0-based): linear warm-up, then the decay."""
    t = train_cfg
    if epoch < t.warmup_epochs:
        return warmup(t.lr, epoch, t.warmup_epochs)
    return decayed(t.lr, t.schedule, epoch, t.epochs, sum(epoch >= s for s in t.lr_steps))


def peak_lr(train_cfg) -> float:
    """``train.lr``, or with ``train.scale_lr`` the base lr times batch/256 (main_moco.py's rule)."""
    t = train_cfg
    return t.lr * t.batch_size / 256 if t.scale_lr else t.lr


def lr_at_step(train_cfg, global_step: int, steps_per_epoch: int) -> float:
    """Per-step learning rate (MoCo v3): linear warm-up over ``warmup_epochs``, then the decay over the
    remaining steps.

    Warm-up step s of W runs at lr * (s + 1) / (W + 1) (main_moco.py's starts at 0): no step is
    wasted at lr 0, and on XLA no step runs with the constant 0 baked into its graph. The peak is
    the first step after warm-up, and cosine ends one step before 0 for the same reason.
    """
    t, lr = train_cfg, peak_lr(train_cfg)
    total = t.epochs * steps_per_epoch
    warm = min(t.warmup_epochs * steps_per_epoch, total - 1)
    if global_step < warm:
        return warmup(lr, global_step, warm)
    passed = sum(global_step >= s * steps_per_epoch for s in t.lr_steps)
    return decayed(lr, t.schedule, global_step - warm, total - warm, passed)


# ----------------------------------------------------------------------------- evaluation

@dataclass
class SGDSpec:
    """Plain SGD with momentum and a schedule over training (milestones as fractions of it)."""

    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"                      # cosine | step | constant
    milestones: tuple[float, ...] = ()            # step: lr *= 0.1 from each fraction on

    def lr_at(self, progress: float) -> float:
        """The rate at ``progress`` (0 = start, 1 = end) of training."""
        passed = sum(progress >= m - 1e-9 for m in self.milestones)
        return decayed(self.lr, self.schedule, progress, 1.0, passed)

    def optimizer(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.SGD:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
