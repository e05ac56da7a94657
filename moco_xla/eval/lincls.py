"""MoCo's lincls protocol: a linear layer on the frozen backbone's pooled features (``eval linear``).

eval.probe sets it: ``augment`` trains through the frozen backbone on random crops every epoch,
otherwise the features are extracted once; top-1 on the test set every ``eval_every`` epochs.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from .. import data
from ..config import Config
from ..data.subsets import with_transform
from ..data.transforms import train_transform
from ..errors import UserError
from ..report import MetricsWriter
from ..runtime import Runtime
from ..schedule import SGDSpec
from .encoder import Encoders
from .fit import fit, image_batches, linear_head
from .probe import FrozenProbe, extract, head_accuracy, train_probe


def probe_sgd(cfg: Config) -> SGDSpec:
    """eval.probe's optimiser: its lr_steps (epochs) become fractions of training."""
    p = cfg.eval.probe
    return SGDSpec(p.lr, p.momentum, p.weight_decay, p.schedule, tuple(s / p.epochs for s in p.lr_steps))


def run_linear(job, rt: Runtime, writer: MetricsWriter) -> dict[str, Any]:
    """MoCo's lincls: a linear layer on the frozen backbone's pooled features."""
    cfg, p = job.cfg, job.cfg.eval.probe
    e, workers, seed = cfg.eval, cfg.data.workers, cfg.train.seed
    bundle = data.build(cfg)
    backbone = Encoders(cfg, job.ckpt).pretrained(rt)
    test = extract(rt, backbone, bundle.test, e.batch_size, workers, p.normalize)
    bar = tqdm(total=p.epochs, desc="linear probe", disable=not rt.is_master, dynamic_ncols=True)
    last: dict[str, float] = {}

    def on_epoch(epoch: int, lr: float, loss: torch.Tensor, head: nn.Module) -> None:
        bar.update(1)
        due = epoch + 1 == p.epochs or (p.eval_every > 0 and (epoch + 1) % p.eval_every == 0)
        top1 = head_accuracy(rt, head, test) if due else None
        rt.add_step_closure(_log_linear, (writer, bar, last, epoch + 1, lr, loss, top1))

    sgd = probe_sgd(cfg)
    if p.augment:  # random crops every epoch: the frozen backbone runs on every step
        train_ds = with_transform(bundle.bank, train_transform(cfg.data.augment, cfg.data.image_size,
                                                               cfg.model.in_channels))
        steps = _steps_per_epoch(len(train_ds), p.batch_size)
        head = linear_head(test.x.shape[1], bundle.num_classes, rt, seed)
        model = FrozenProbe(backbone, head, p.normalize).train()
        batches = image_batches(rt, train_ds, p.batch_size // rt.world_size, seed, workers)
        fit(rt, model, list(model.head.parameters()), batches, p.epochs, steps, sgd,
            lambda ep, lr, loss: on_epoch(ep, lr, loss, model.head))
    else:  # features once: an epoch costs a few matrix products
        train = extract(rt, backbone, bundle.bank, e.batch_size, workers, p.normalize)
        steps = _steps_per_epoch(train.total, p.batch_size)
        train_probe(rt, train, bundle.num_classes, sgd, p.epochs, steps, p.batch_size, seed, on_epoch)
    rt.mark_step()  # runs the last epoch's closure
    bar.close()
    return {"linear_top1": last["top1"], "linear": {
        "top1": last["top1"], "epochs": p.epochs, "lr": p.lr, "schedule": p.schedule, "augment": p.augment,
        "batch_size": p.batch_size, "ckpt": job.ckpt, "train_images": len(bundle.bank),
        "test_images": len(bundle.test)}}


def _steps_per_epoch(n: int, batch: int) -> int:
    if n < batch:
        raise UserError(f"eval.probe.batch_size={batch} exceeds the {n} training images; lower it")
    return n // batch


def _log_linear(writer: MetricsWriter, bar: tqdm, last: dict, epoch: int, lr: float, loss: torch.Tensor,
                top1: torch.Tensor | None) -> None:
    """Step closure: the probe's one host read per epoch."""
    record = {"type": "linear", "epoch": epoch, "lr": lr, "loss": float(loss)}
    if top1 is not None:
        record["top1"] = last["top1"] = float(top1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", top1=f"{record['top1']:.2f}")
    writer.write(record)
