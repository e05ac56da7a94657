"""The per-replica MoCo training loop (read it like pytorch/xla's test_train_mp_imagenet.py).

Every replica runs ``train(cfg, rt, out_dir)`` with its own Runtime. The loop
never reads a device tensor per step: loss and accuracy accumulate on the
device and reach the host only through step closures at log intervals.
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import data
from .config import Config
from .knn import knn_accuracy
from .models import build_encoder
from .moco import MoCo
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
    return torch.optim.SGD(model.encoder_q.parameters(), lr=t.lr, momentum=t.momentum,
                           weight_decay=t.weight_decay)


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


def train(cfg: Config, rt: Runtime, out_dir: str | Path) -> dict[str, Any]:
    """Pre-train MoCo on this replica; returns the summary (identical on every replica)."""
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
    writer = MetricsWriter(out_dir, enabled=rt.is_master)
    collapse = CollapseDetector(cfg, model.uniform_loss())
    steps_per_epoch = len(loader)
    global_step, knn_top1, start = 0, None, time.time()
    images_per_s = 0.0
    epoch_log: dict[str, Any] = {}

    for epoch in range(cfg.train.epochs):
        lr = lr_at(cfg, epoch)
        set_lr(optimizer, lr)
        loader.set_epoch(epoch)
        model.train()
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                   disable=not rt.is_master, leave=False, dynamic_ncols=True)
        loss_sum = torch.zeros((), device=rt.device)
        acc_sum = torch.zeros((), device=rt.device)
        t0 = time.time()
        for step, (im_q, im_k) in enumerate(rt.device_loader(loader)):
            with rt.autocast(cfg.train.precision):
                loss, stats = model(im_q, im_k)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                rt.reduce_gradients(optimizer)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                rt.optimizer_step(optimizer)
            loss_sum += stats["loss"]
            acc_sum += stats["acc"]
            global_step += 1
            bar.update(1)
            if (step + 1) % cfg.train.log_every == 0:
                rt.add_step_closure(_log_step, (writer, bar, epoch, global_step, lr, stats["loss"],
                                                stats["acc"], (step + 1) * cfg.train.batch_size, t0))
        rt.mark_step()
        bar.close()
        epoch_log = {}
        sums = rt.all_reduce(torch.stack([loss_sum, acc_sum]), op="mean")  # one collective per epoch
        rt.add_step_closure(_read_epoch, (epoch_log, sums, steps_per_epoch))
        rt.mark_step()
        wall = time.time() - t0
        images_per_s = steps_per_epoch * cfg.train.batch_size / max(wall, 1e-9)
        record = {"type": "epoch", "epoch": epoch + 1, "step": global_step, "lr": lr,
                  "images_per_s": images_per_s, "epoch_s": wall, **epoch_log}
        if _knn_due(cfg, epoch):
            knn_top1 = float(knn_accuracy(
                rt, model.encoder_q.backbone, bundle.bank, bundle.test, bundle.num_classes,
                cfg.eval.knn_k, cfg.eval.knn_t, cfg.eval.batch_size, cfg.eval.max_bank, cfg.data.workers))
            record["knn_top1"] = knn_top1
        record["collapse"] = collapse.check(epoch, epoch_log["loss"])
        writer.write(record)
        if rt.is_master:
            knn = f"  knn {knn_top1:.2f}%" if "knn_top1" in record else ""
            tqdm.write(f"epoch {epoch + 1}/{cfg.train.epochs}  loss {epoch_log['loss']:.4f}  "
                       f"acc {epoch_log['acc']:.1f}%  lr {lr:.4g}  {images_per_s:.0f} img/s{knn}")

    summary = {
        "config": cfg.name, "knn_top1": knn_top1, "epochs": cfg.train.epochs, "steps": global_step,
        "wall_s": time.time() - start, "images_per_s": images_per_s, "world_size": world,
        "backend": rt.name, "final_loss": epoch_log.get("loss"),
        "uniform_loss": model.uniform_loss(),
        "skipped_samples": data.skipped_total(rt, bundle),  # data.on_bad_sample=skip, all replicas
    }
    if rt.is_master:
        write_summary(out_dir, summary)
    writer.close()
    return summary


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
