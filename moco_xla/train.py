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
from .config import Config, validate_world
from .errors import NonFiniteLoss, Preempted, UserError
from .knn import knn_accuracy
from .models import build_encoder, to_channels_last
from .moco import MoCo
from .moco_v3 import MoCoV3, build_moco_v3, momentum_at
from .optim import build_optimizer as build_train_optimizer, lr_at_step
from .pixel_knn import PixelReference
from .profiling import GraphWatch, StepProfiler
from .report import MetricsWriter, write_summary
from .runtime import Runtime


def build_model(cfg: Config, rt: Runtime) -> MoCo | MoCoV3:
    """Query encoder + momentum key encoder (+ queue; v3: + predictor), identical on every replica."""
    rt.manual_seed(cfg.train.seed)  # same init everywhere; sync_module makes it certain
    m = cfg.moco
    with rt.cpu_rng():  # this replica's own stream where replica threads share a process
        if m.version == 3:
            model: MoCo | MoCoV3 = build_moco_v3(cfg, rt).to(rt.device)
        else:
            encoder = build_encoder(cfg.model, rt)
            model = MoCo(encoder, rt, cfg.model.dim, m.K, m.m, m.T, m.symmetric, m.shuffle).to(rt.device)
    to_channels_last(model, cfg.model, rt.device)  # model.channels_last (CUDA ResNets by default)
    rt.sync_module(model)  # PJRT replica threads initialise nondeterministically
    return model


def build_optimizer(cfg: Config, model: MoCo | MoCoV3) -> torch.optim.Optimizer:
    """train.optimizer over what the gradient trains: the query encoder (v3: and the predictor)."""
    params = list(model.encoder_q.parameters())
    if isinstance(model, MoCoV3):
        params += list(model.predictor.parameters())
    return build_train_optimizer(cfg.train, params)


def step_schedule(cfg: Config, model: MoCo | MoCoV3, optimizer: torch.optim.Optimizer,
                  steps_per_epoch: int) -> Callable[[int], float] | None:
    """MoCo v3 sets lr and momentum before every step (main_moco.py); None for v1/v2 (per epoch)."""
    if not isinstance(model, MoCoV3):
        return None
    total = cfg.train.epochs * steps_per_epoch

    def before_step(global_step: int) -> float:
        lr = lr_at_step(cfg.train, global_step, steps_per_epoch)
        set_lr(optimizer, lr)
        model.set_momentum(momentum_at(cfg.moco.m, global_step / total))
        return lr
    return before_step


def compile_encoders(cfg: Config, rt: Runtime, model: torch.nn.Module) -> None:
    """train.compile: torch.compile both encoders in place (Module.compile keeps the module tree,
    so checkpoints, kNN and evaluation see the same names). Off by default: on CPU the compiled
    step was slower (docs/benchmarks.md). XLA compiles the whole step graph already."""
    if not cfg.train.compile:
        return
    if rt.name == "xla":
        raise UserError("train.compile=true is for the cuda and cpu backends; on XLA the step is "
                        "already one compiled graph (valid there: train.compile=false)")
    model.encoder_q.compile(backend=cfg.train.compile_backend)
    model.encoder_k.compile(backend=cfg.train.compile_backend)


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
    validate_world(cfg, world)  # again here: on a pod slice the launcher saw one host of several
    batch = cfg.train.batch_size // world
    bundle = data.build(cfg)
    model = build_model(cfg, rt)
    optimizer = build_optimizer(cfg, model)
    compile_encoders(cfg, rt, model)
    scaler = rt.grad_scaler(cfg.train.precision)
    rt.manual_seed(cfg.train.seed * 1000 + rt.rank)  # replicas draw different augmentations
    loader = data.pretrain_loader(bundle.pretrain, batch, rt.rank, world, cfg.train.seed,
                                  cfg.data.workers, cfg.train.max_steps_per_epoch,
                                  pin_memory=rt.device.type == "cuda")
    steps_per_epoch = len(loader)
    before_step = step_schedule(cfg, model, optimizer, steps_per_epoch)
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
    pixels = PixelReference(rt, bundle, cfg.eval, cfg.data.workers)  # the raw-pixel kNN, once per run

    def checkpoint(lr: float, sums: torch.Tensor) -> str:
        pos.wall_s = wall_before + time.time() - session_start
        with watch.region("checkpoint"):
            rt.sync_batchnorm_stats(model)  # a resumed run gives every replica these statistics
            guard.last_checkpoint = save_checkpoint(rt, store, cfg, model, optimizer, scaler, pos, lr, sums)
        return guard.last_checkpoint

    def monitor_knn(epoch: int) -> float:
        """kNN on the query backbone; every replica first takes rank 0's BN statistics, so N
        replicas score exactly what one would."""
        # fork_rng: evaluating (its DataLoaders draw seeds) must not shift training's RNG stream
        with watch.region("knn"), torch.random.fork_rng(devices=[]):
            rt.sync_batchnorm_stats(model)
            pos.knn_top1 = float(knn_accuracy(
                rt, model.encoder_q.backbone, bundle.bank, bundle.test, bundle.num_classes,
                cfg.eval.knn_k, cfg.eval.knn_t, cfg.eval.batch_size, cfg.eval.max_bank, cfg.data.workers))
            pixels.measure()
        pos.knn_epoch = epoch + 1
        return pos.knn_top1

    _resumed_at = pos.global_step
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
            if before_step is not None:  # MoCo v3: lr and momentum per step
                lr = before_step(pos.global_step)
            with rt.autocast(cfg.train.precision):
                loss, stats = model(im_q, im_k)
            optimizer.zero_grad(set_to_none=True)
            rt.backward_step(loss, optimizer, scaler)  # all-reduced gradients, then the step
            sums += torch.stack([stats["loss"], stats["acc"]]).float()
            guard.observe(stats["loss"])
            pos.step, pos.global_step = step + 1, pos.global_step + 1
            bar.update(1)
            mid_epoch = pos.step < steps_per_epoch  # the epoch end decides synchronously below
            logging = pos.step % cfg.train.log_every == 0
            polling = pos.global_step % cfg.train.stop_every == 0  # independent of logging
            if logging:
                rt.add_step_closure(_log_step, (writer, bar, epoch, pos.global_step, lr, stats["loss"],
                                                stats["acc"], (pos.step - start) * cfg.train.batch_size, t0))
            if polling:
                stop = mid_epoch and guard.poll()
            every = cfg.checkpoint.every_steps
            saving = mid_epoch and (stop or bool(every and pos.global_step % every == 0))
            watch.step(log=logging, poll=polling, checkpoint=saving)  # this step's window ends here
            if saving:
                stop = guard.agree() or stop
                path = checkpoint(lr, sums)
                if stop:
                    bar.close()
                    _preempted(path, pos, steps_per_epoch)
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
        pos.epoch, pos.step, pos.final_loss = epoch + 1, 0, epoch_log["loss"]
        last = epoch + 1 == cfg.train.epochs
        every = cfg.checkpoint.every
        if stop or (every and ((epoch + 1) % every == 0 or last)):
            # before the kNN: a resumed run never repeats it, nor loses the epoch to it
            path = checkpoint(lr, torch.zeros(2))
            if stop and not last:
                writer.write(record)
                _preempted(path, pos, steps_per_epoch)
        if _knn_due(cfg, epoch):
            record["knn_top1"], record["pixel_knn_top1"] = monitor_knn(epoch), pixels.top1
        record["collapse"] = collapse.check(epoch, epoch_log["loss"])
        writer.write(record)
        if rt.is_master:
            knn = f"  knn {pos.knn_top1:.2f}% (pixels {pixels.top1:.2f}%)" if "knn_top1" in record else ""
            tqdm.write(f"epoch {epoch + 1}/{cfg.train.epochs}  loss {epoch_log['loss']:.4f}  "
                       f"acc {epoch_log['acc']:.1f}%  lr {lr:.4g}  {pos.images_per_s:.0f} img/s{knn}")

    if pos.knn_epoch < pos.epoch == cfg.train.epochs and resume and pos.global_step == _resumed_at:
        # resumed from the final checkpoint, written before its kNN: the kNN is what is left
        writer.write({"type": "epoch", "epoch": pos.epoch, "step": pos.global_step, "loss": pos.final_loss,
                      "knn_top1": monitor_knn(pos.epoch - 1), "pixel_knn_top1": pixels.top1})
    profiler.stop()
    watch.enter("finish")
    pos.wall_s = wall_before + time.time() - session_start
    summary = {
        "config": cfg.name, "knn_top1": pos.knn_top1, "pixel_knn_top1": pixels.top1,
        "epochs": cfg.train.epochs, "steps": pos.global_step,
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
