"""The per-replica MoCo training loop (read it like pytorch/xla's test_train_mp_imagenet.py).

Every replica runs ``train(cfg, rt, out_dir)`` with its own Runtime. The loop
never reads a device tensor per step: loss and accuracy accumulate on the
device and reach the host only through step closures at log intervals.
Checkpoints (checkpoint.py) hold everything needed to continue bit-identically,
mid-epoch included; SIGTERM and NaN/inf losses are agreed on across replicas by
``StopGuard`` at log intervals, so every replica stops at the same step.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from . import data
from .checkpoint import CheckpointStore, Position, checkpoint_dir, load_checkpoint, restore, save_checkpoint
from .config import Config
from .errors import NonFiniteLoss, Preempted, UserError
from .knn import knn_accuracy
from .models import build_encoder
from .moco import MoCo
from .optim import prime_momentum
from .profiling import GraphWatch, StepProfiler
from .report import MetricsWriter, write_summary
from .runtime import Runtime


def build_model(cfg: Config, rt: Runtime) -> MoCo:
    """Query encoder + momentum key encoder + queue, identical on every replica."""
    torch.manual_seed(cfg.train.seed)  # same init everywhere; sync_module makes it certain
    encoder = build_encoder(cfg.model, rt)
    m = cfg.moco
    model = MoCo(encoder, rt, cfg.model.dim, m.K, m.m, m.T, m.symmetric, m.shuffle).to(rt.device)
    rt.sync_module(model)  # PJRT replica threads initialise nondeterministically
    return model


def build_optimizer(cfg: Config, model: MoCo) -> torch.optim.SGD:
    t = cfg.train
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=t.lr, momentum=t.momentum,
                          weight_decay=t.weight_decay)
    prime_momentum(opt)
    return opt


def lr_at(cfg: Config, epoch: int) -> float:
    """Learning rate for ``epoch`` (0-based): linear warm-up, then cosine or step decay."""
    t = cfg.train
    if epoch < t.warmup_epochs:
        return t.lr * (epoch + 1) / (t.warmup_epochs + 1)
    if t.schedule == "cosine":
        return t.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / t.epochs))
    if t.schedule == "step":
        return t.lr * 0.1 ** sum(epoch >= s for s in t.lr_steps)
    return t.lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class CollapseDetector:
    """Warns when the loss sits at ln(K+1) per view, the loss of uniform logits, after warm-up.

    A collapsed MoCo run looks healthy in every other respect: the loss is finite
    and steady. Users of other MoCo code find out days later from a kNN number.
    """

    def __init__(self, cfg: Config, uniform_loss: float) -> None:
        self.uniform = uniform_loss
        self.after = max(2, cfg.train.warmup_epochs + 1)
        self.enabled = cfg.train.collapse_warn
        self.views = 2 if cfg.moco.symmetric else 1

    def check(self, epoch: int, mean_loss: float) -> bool:
        collapsed = epoch + 1 >= self.after and mean_loss > 0.98 * self.uniform
        if collapsed and self.enabled:
            warnings.warn(
                f"possible collapse at epoch {epoch + 1}: loss {mean_loss / self.views:.3f} per view is at "
                f"ln(K+1) = {self.uniform / self.views:.3f}, the value of uniform logits; the features "
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


def train(cfg: Config, rt: Runtime, out_dir: str | Path, resume: str | None = None,
          stop_requested: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """Pre-train MoCo on this replica; returns the summary (identical on every replica).

    ``resume``: a checkpoint to continue from, exactly where it stopped. When
    ``stop_requested()`` turns true on any replica (SIGTERM), all replicas stop at the same
    step, write a checkpoint and raise Preempted. A NaN/inf loss raises NonFiniteLoss
    before anything broken is saved.
    """
    out_dir = Path(out_dir)
    world = rt.world_size
    batch = cfg.train.batch_size // world
    bundle = data.build(cfg)
    model = build_model(cfg, rt)
    optimizer = build_optimizer(cfg, model)
    scaler = rt.grad_scaler(cfg.train.precision)
    torch.manual_seed(cfg.train.seed * 1000 + rt.rank)  # replicas draw different augmentations
    loader = data.pretrain_loader(bundle.pretrain, batch, rt.rank, world, cfg.train.seed,
                                  cfg.data.workers, cfg.train.max_steps_per_epoch)
    steps_per_epoch = len(loader)
    store = CheckpointStore(checkpoint_dir(cfg, out_dir), cfg.checkpoint.keep)
    pos, carried_sums, restore_rng = Position(), torch.zeros(2), lambda: None
    if resume:
        pos, carried_sums, restore_rng = restore(load_checkpoint(resume), rt, model, optimizer, scaler)
        _check_position(pos, steps_per_epoch, resume)
        if rt.is_master:
            tqdm.write(f"resuming {resume} at epoch {pos.epoch + 1}, step {pos.step}/{steps_per_epoch} "
                       f"(global step {pos.global_step})")
    if rt.is_master:
        trim_metrics(out_dir, pos.global_step)
    writer = MetricsWriter(out_dir, enabled=rt.is_master, purge_step=pos.global_step + 1 if resume else None)
    collapse = CollapseDetector(cfg, model.uniform_loss())
    guard = StopGuard(rt, pos.global_step, steps_per_epoch, stop_requested)
    guard.last_checkpoint = resume
    watch, profiler = GraphWatch(rt), StepProfiler(rt)  # XLA graph hygiene; --profile DIR traces
    session_start, wall_before = time.time(), pos.wall_s

    def checkpoint(lr: float, sums: torch.Tensor) -> str:
        pos.wall_s = wall_before + time.time() - session_start
        with watch.region("checkpoint"):
            guard.last_checkpoint = save_checkpoint(rt, store, cfg, model, optimizer, scaler, pos, lr, sums)
        return guard.last_checkpoint

    restore_rng()  # last thing before the first step
    for epoch in range(pos.epoch, cfg.train.epochs):
        start = pos.step
        lr = lr_at(cfg, epoch)
        set_lr(optimizer, lr)
        loader.set_epoch(epoch, start)
        model.train()
        bar = tqdm(total=steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                   disable=not rt.is_master, leave=False, dynamic_ncols=True)
        # loss, acc sums; copied from the host so no epoch adds a zeros graph of its own (XLA)
        sums = (carried_sums if start else torch.zeros(2)).to(rt.device)
        stop, t0 = False, time.time()
        watch.enter("train")
        for step, (im_q, im_k) in enumerate(rt.device_loader(loader), start=start):
            with rt.autocast(cfg.train.precision):
                loss, stats = model(im_q, im_k)
            optimizer.zero_grad(set_to_none=True)
            rt.backward_step(loss, optimizer, scaler)  # all-reduced gradients, then the step
            sums += torch.stack([stats["loss"], stats["acc"]]).float()
            guard.observe(stats["loss"])
            pos.step, pos.global_step = step + 1, pos.global_step + 1
            bar.update(1)
            mid_epoch = pos.step < steps_per_epoch  # the epoch end decides synchronously below
            if pos.step % cfg.train.log_every == 0:
                rt.add_step_closure(_log_step, (writer, bar, epoch, pos.global_step, lr, stats["loss"],
                                                stats["acc"], (pos.step - start) * cfg.train.batch_size, t0))
                stop = mid_epoch and guard.poll()
            every = cfg.checkpoint.every_steps
            saving = mid_epoch and (stop or bool(every and pos.global_step % every == 0))
            if saving:
                stop = guard.agree() or stop
                path = checkpoint(lr, sums)
                if stop:
                    bar.close()
                    _preempted(path, pos, steps_per_epoch)
            watch.step(log=pos.step % cfg.train.log_every == 0, checkpoint=saving)
            profiler.step()
        rt.mark_step()
        watch.enter("epoch_end")
        bar.close()
        stop = guard.agree()
        epoch_log: dict[str, Any] = {}
        means = rt.all_reduce(sums, op="mean")  # one collective per epoch
        rt.add_step_closure(_read_epoch, (epoch_log, means, steps_per_epoch))
        rt.mark_step()
        wall = time.time() - t0
        pos.images_per_s = (pos.step - start) * cfg.train.batch_size / max(wall, 1e-9)
        record = {"type": "epoch", "epoch": epoch + 1, "step": pos.global_step, "lr": lr,
                  "images_per_s": pos.images_per_s, "epoch_s": wall, **epoch_log}
        if _knn_due(cfg, epoch):
            # fork_rng: evaluating (its DataLoaders draw seeds) must not shift training's RNG stream
            with watch.region("knn"), torch.random.fork_rng(devices=[]):
                pos.knn_top1 = float(knn_accuracy(
                    rt, model.encoder_q.backbone, bundle.bank, bundle.test, bundle.num_classes,
                    cfg.eval.knn_k, cfg.eval.knn_t, cfg.eval.batch_size, cfg.eval.max_bank, cfg.data.workers))
            record["knn_top1"] = pos.knn_top1
        record["collapse"] = collapse.check(epoch, epoch_log["loss"])
        writer.write(record)
        if rt.is_master:
            knn = f"  knn {pos.knn_top1:.2f}%" if "knn_top1" in record else ""
            tqdm.write(f"epoch {epoch + 1}/{cfg.train.epochs}  loss {epoch_log['loss']:.4f}  "
                       f"acc {epoch_log['acc']:.1f}%  lr {lr:.4g}  {pos.images_per_s:.0f} img/s{knn}")
        pos.epoch, pos.step, pos.final_loss = epoch + 1, 0, epoch_log["loss"]
        last = epoch + 1 == cfg.train.epochs
        every = cfg.checkpoint.every
        if stop or (every and ((epoch + 1) % every == 0 or last)):
            path = checkpoint(lr, torch.zeros(2))
            if stop and not last:
                _preempted(path, pos, steps_per_epoch)

    profiler.stop()
    watch.enter("finish")
    pos.wall_s = wall_before + time.time() - session_start
    summary = {
        "config": cfg.name, "knn_top1": pos.knn_top1, "epochs": cfg.train.epochs, "steps": pos.global_step,
        "wall_s": pos.wall_s, "images_per_s": pos.images_per_s, "world_size": world,
        "backend": rt.name, "final_loss": pos.final_loss, "uniform_loss": model.uniform_loss(),
        "skipped_samples": data.skipped_total(rt, bundle),  # data.on_bad_sample=skip, all replicas
        "precision": rt.resolve_precision(cfg.train.precision), "xla_graph": watch.report(),
    }
    if rt.is_master:
        write_summary(out_dir, summary)
    writer.close()
    return summary


def _check_position(pos: Position, steps_per_epoch: int, source: str) -> None:
    if pos.step > steps_per_epoch:
        raise UserError(f"checkpoint {source} stopped at step {pos.step} of an epoch, but an epoch "
                        f"now has {steps_per_epoch} steps: the data changed (data.root?)")


def _preempted(path: str, pos: Position, steps_per_epoch: int) -> None:
    raise Preempted(f"stopped on SIGTERM after global step {pos.global_step} (epoch {pos.epoch + 1}, "
                    f"step {pos.step}/{steps_per_epoch}); checkpoint {path}. Rerun the same command "
                    f"with --resume auto to continue")


def trim_metrics(out_dir: Path, global_step: int) -> None:
    """Drop records past the resumed step (and a line cut by a kill): the rerun writes them again."""
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= global_step:
                keep.append(line)
        except ValueError:
            continue
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(f"{line}\n" for line in keep))
    os.replace(tmp, path)


def _knn_due(cfg: Config, epoch: int) -> bool:
    every = cfg.eval.knn_every
    return epoch + 1 == cfg.train.epochs or (every > 0 and (epoch + 1) % every == 0)


def _log_step(writer: MetricsWriter, bar: tqdm, epoch: int, step: int, lr: float, loss: torch.Tensor,
              acc: torch.Tensor, images: int, t0: float) -> None:
    """Step closure: runs once the step's tensors exist, so reading them costs no extra sync."""
    loss_v, acc_v = float(loss), float(acc) * 100
    img_s = images / max(time.time() - t0, 1e-9)
    bar.set_postfix(loss=f"{loss_v:.3f}", acc=f"{acc_v:.1f}", img_s=f"{img_s:.0f}", lr=f"{lr:.3g}")
    writer.write({"type": "step", "epoch": epoch + 1, "step": step, "loss": loss_v, "acc": acc_v,
                  "lr": lr, "images_per_s": img_s})


def _read_epoch(out: dict, sums: torch.Tensor, steps: int) -> None:
    loss_sum, acc_sum = sums.tolist()  # step closure: the epoch's one host read
    out["loss"] = loss_sum / steps
    out["acc"] = acc_sum / steps * 100
