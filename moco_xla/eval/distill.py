"""Distillation: a student learns a frozen teacher's predictions (SimCLRv2, Noisy Student).

Without a teacher the student learns the labels its batches carry for every image: label
propagation's (labelprop.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..runtime import Runtime
from ..schedule import SGDSpec
from .fit import Batches, fit, linear_head


@dataclass
class DistillSpec:
    """The distillation loss on the unlabelled term, plus ``label_weight`` x the labelled images' CE.

    targets "soft": SimCLRv2's T^2 KL(teacher || student) at temperature T; "hard": the
    cross-entropy on the teacher's top class (Noisy Student's hard pseudo-labels; T unused).
    """

    temperature: float = 1.0
    label_weight: float = 1.0
    targets: str = "soft"


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL of the softened student from the softened teacher, times T^2 (gradients keep their scale in T)."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1), reduction="batchmean",
                  log_target=True)
    return kl * (t * t)


Step = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def paired(everything: Batches, labelled: Batches) -> Iterator[Step]:
    """One distillation step's batch: (teacher's view and student's view of images from the whole
    train set, their labels in ``everything`` (the propagated ones when there is no teacher), labelled
    images, their labels). ``everything`` yields (clean, augmented) pairs or single images (then teacher
    and student see the same crop, as in SimCLRv2)."""
    for (x_all, y_all), (x_lab, y_lab) in zip(everything, labelled):
        x_teacher, x_student = x_all if isinstance(x_all, (tuple, list)) else (x_all, x_all)
        yield x_teacher, x_student, y_all, x_lab, y_lab


def distill(rt: Runtime, teacher: nn.Module | None, backbone: nn.Module, feat_dim: int, classes: int,
            batches: Iterator[Step], steps: int, sgd: SGDSpec,
            spec: DistillSpec, seed: int = 0,
            on_epoch: Callable[[int, float, torch.Tensor], None] | None = None) -> nn.Module:
    """A student (``backbone`` + a fresh head) trained to match the frozen ``teacher`` on ``batches``.

    Every step sees a batch of any training images (the teacher's predictions on them are the
    targets, soft or hard as ``spec.targets`` says) and a batch of labelled ones (cross-entropy,
    weight ``spec.label_weight``), both augmented for the student; the teacher sees the same
    crops or, from clean_and_augmented pairs, the clean images; the student's BN normalises both
    batches together. Gradients average over replicas
    as in ``fit``; the teacher runs in eval mode without gradients. Without a teacher the targets
    are the labels ``batches`` carry for every image (label propagation's).
    """
    if teacher is not None:
        teacher.eval()
        for q in teacher.parameters():
            q.requires_grad_(False)
    student = nn.Sequential(backbone.to(rt.device), linear_head(feat_dim, classes, rt, seed)).train()
    rt.sync_module(student)

    def loss_fn(model: nn.Module, batch: Step) -> torch.Tensor:
        x_teacher, x_all, y_all, x_lab, y_lab = batch
        logits = model(torch.cat([x_all, x_lab])).float()
        ours = logits[: len(x_all)]
        if teacher is None:
            loss = F.cross_entropy(ours, y_all)
        else:
            with torch.no_grad():
                target = teacher(x_teacher).float()
            loss = (F.cross_entropy(ours, target.argmax(dim=1)) if spec.targets == "hard"
                    else distill_loss(ours, target, spec.temperature))
        if spec.label_weight > 0:
            loss = loss + spec.label_weight * F.cross_entropy(logits[len(x_all):], y_lab)
        return loss

    fit(rt, student, list(student.parameters()), batches, steps, 1, sgd, on_epoch, loss_fn)
    rt.sync_module(student)
    return student
