"""What stops or warns a training run, decided the same way on every replica.

``StopGuard``: SIGTERM on any replica or a NaN/inf loss, agreed across replicas at log intervals
without a per-step host read. ``CollapseDetector``: a loss sitting at the value of uniform logits.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from .config import Config
from .errors import NonFiniteLoss
from .runtime import Runtime


class CollapseDetector:
    """Warns when the loss sits at ln(K+1) per view, the loss of uniform logits, after warm-up.

    A collapsed MoCo run looks healthy in every other respect: the loss is finite
    and steady. Users of other MoCo code find out days later from a kNN number.
    """

    def __init__(self, cfg: Config, uniform_loss: float) -> None:
        self.uniform = uniform_loss
        self.after = max(2, cfg.train.warmup_epochs + 1)
        self.enabled = cfg.train.collapse_warn
        self.v3 = cfg.moco.version == 3
        self.views = 2 if cfg.moco.symmetric or self.v3 else 1

    def check(self, epoch: int, mean_loss: float) -> bool:
        collapsed = epoch + 1 >= self.after and mean_loss > 0.98 * self.uniform
        if collapsed and self.enabled:
            warnings.warn(
                f"possible collapse at epoch {epoch + 1}: loss {mean_loss / self.views:.3f} per view is at "
                f"{'2T ln(batch)' if self.v3 else 'ln(K+1)'} = {self.uniform / self.views:.3f}, the value of "
                f"uniform logits; the features "
                f"are likely no better than random. Lower train.lr, raise model.bn_splits, or check BN.",
                RuntimeWarning, stacklevel=2)
        return collapsed


class StopGuard:
    """Decides, identically on every replica, when training must stop: SIGTERM or a non-finite loss.

    Per step it only updates device tensors (a step counter and the first step whose loss
    was NaN/inf): no host read. At log intervals ``poll`` all_gathers [stop requested, first
    bad step] and reads the gather of the *previous* interval, long finished by then, so XLA
    never stalls on it; every replica reads the same values and stops at the same step.
    ``agree`` decides synchronously, before any checkpoint is written.
    """

    NEVER = 2 ** 31 - 1

    def __init__(self, rt: Runtime, global_step: int, steps_per_epoch: int,
                 stop_requested: Callable[[], bool]) -> None:
        self.rt, self.steps_per_epoch, self.stop_requested = rt, steps_per_epoch, stop_requested
        self.step = torch.tensor(global_step, dtype=torch.int32, device=rt.device)
        self.never = torch.tensor(self.NEVER, dtype=torch.int32, device=rt.device)
        self.first_bad = self.never.clone()
        self.pending: torch.Tensor | None = None
        self.last_checkpoint: str | None = None

    def observe(self, loss: torch.Tensor) -> None:
        self.step += 1
        bad_here = torch.where(torch.isfinite(loss.detach()), self.never, self.step)
        self.first_bad = torch.minimum(self.first_bad, bad_here)

    def poll(self) -> bool:
        """At a log interval: True once the replicas agreed to stop. Raises NonFiniteLoss."""
        previous, self.pending = self.pending, self._gather()
        return previous is not None and self._decide(previous)

    def agree(self) -> bool:
        """Synchronous decision (epoch end, before a checkpoint). Raises NonFiniteLoss."""
        self.pending = None
        return self._decide(self._gather())

    def _gather(self) -> torch.Tensor:
        self.rt.mark_step()  # keep the step's graph the one every step runs; this one is tiny
        flag = torch.tensor([int(self.stop_requested())], dtype=torch.int32, device=self.rt.device)
        return self.rt.all_gather(torch.cat([flag, self.first_bad.view(1)]).view(1, 2))

    def _decide(self, status: torch.Tensor) -> bool:
        status = status.cpu()  # the host read: once per log interval
        bad = int(status[:, 1].min())
        if bad != self.NEVER:
            epoch, step = (bad - 1) // self.steps_per_epoch + 1, (bad - 1) % self.steps_per_epoch + 1
            last = self.last_checkpoint or "none yet"
            raise NonFiniteLoss(
                f"loss became NaN/inf at global step {bad} (epoch {epoch}, step {step}/"
                f"{self.steps_per_epoch}); no checkpoint was written after it, the last good one is "
                f"{last}. Lower train.lr (or check the data) and rerun with --resume auto")
        return bool(status[:, 0].max() > 0)
