"""The per-replica MoCo training loop (read it like pytorch/xla's test_train_mp_imagenet.py).

Every replica runs ``train(cfg, rt, out_dir)`` with its own Runtime: ``setup`` builds the model,
optimizer and loader once, then each epoch is ``train_one_epoch`` (the steps; ``after_step`` keeps
the log, stop and mid-epoch checkpoint bookkeeping) and ``end_epoch`` (means, checkpoint,
``evaluate``: the kNN monitor, collapse check); ``finish`` writes the summary. The loop
never reads a device tensor per step: loss and accuracy accumulate on the
device and reach the host only through step closures at log intervals.
Checkpoints (checkpoint.py) hold everything needed to continue bit-identically,
mid-epoch included; SIGTERM and NaN/inf losses are agreed on across replicas by
``StopGuard`` at log intervals, so every replica stops at the same step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from . import data
from .averaging import WeightAverage
from .checkpoint import CheckpointStore, Position, checkpoint_dir, load_checkpoint, restore, save_checkpoint
from .config import Config, validate_world
from .errors import Preempted, UserError
from .eval.knn import knn_accuracy
from .guards import CollapseDetector, StopGuard
from .models import build_encoder, to_channels_last
from .moco import MoCo
from .moco_v3 import MoCoV3, build_moco_v3, momentum_at
from .optim import build_optimizer as build_train_optimizer
from .schedule import lr_at_epoch, lr_at_step, set_lr
from .eval.pixel_knn import PixelReference
from .eval.readout import knn_readout, monitored_encoder
from .profiling import GraphWatch, StepProfiler
from .records import RecordsMirror, records_url
from .report import MetricsWriter, trim_metrics, write_summary
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
            model = MoCo(encoder, rt, cfg.model.dim, m.K, m.m, m.T, m.symmetric, m.shuffle, m.debias,
                         m.nn_weight).to(rt.device)
        if cfg.train.average_from:  # the query encoder's weights averaged over the last epochs
            model.encoder_avg = WeightAverage(model.encoder_q).to(rt.device)
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
    """MoCo v3 sets lr and momentum before every step (main_moco.py); v1/v2 set the momentum
    before every step where moco.m_cosine asks for v3's schedule (their lr stays per epoch); None
    otherwise. The returned function gives the step's lr. (v1/v2's nearest-key warm-up is set here
    once, in steps; the model counts them on the device.)"""
    v3 = isinstance(model, MoCoV3)
    if not v3:
        model.nn_warmup_steps = cfg.moco.nn_warmup_epochs * steps_per_epoch
    if not (v3 or cfg.moco.m_cosine):
        return None
    total = cfg.train.epochs * steps_per_epoch

    def before_step(global_step: int) -> float:
        model.set_momentum(momentum_at(cfg.moco.m, global_step / total))
        if not v3:
            return lr_at_epoch(cfg.train, global_step // steps_per_epoch)
        lr = lr_at_step(cfg.train, global_step, steps_per_epoch)
        set_lr(optimizer, lr)
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
    backend = rt.compile_backend(cfg.train.compile_backend)  # TorchTPU: "tpu"
    model.encoder_q.compile(backend=backend)
    model.encoder_k.compile(backend=backend)


@dataclass
class Session:
    """One replica's training: what ``setup`` builds once and every epoch uses."""

    cfg: Config
    rt: Runtime
    out_dir: Path
    bundle: data.DataBundle
    model: MoCo | MoCoV3
    optimizer: torch.optim.Optimizer
    scaler: Any
    loader: Any
    augment: Callable[[torch.Tensor], torch.Tensor]  # the views' colour ops on the device, or identity
    steps_per_epoch: int
    before_step: Callable[[int], float] | None   # MoCo v3: lr and momentum per step (v1/v2 m_cosine: momentum)
    store: CheckpointStore
    pos: Position
    carried_sums: torch.Tensor                   # a resumed epoch's loss/acc sums so far
    writer: MetricsWriter
    collapse: CollapseDetector
    guard: StopGuard
    watch: GraphWatch
    profiler: StepProfiler
    resume: str | None
    resumed_at: int                              # the global step this session started at
    wall_before: float                           # training time of the sessions before this one
    pixels: PixelReference                       # the raw-pixel kNN, measured once per run
    session_start: float = field(default_factory=time.time)


@dataclass
class EpochRun:
    """What an epoch's steps leave for its end: device sums, the last lr, where and when it started."""

    sums: torch.Tensor
    lr: float
    start: int
    t0: float


def train(cfg: Config, rt: Runtime, out_dir: str | Path, resume: str | None = None,
          stop_requested: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """Pre-train MoCo on this replica; returns the summary (identical on every replica).

    ``resume``: a checkpoint to continue from, exactly where it stopped. When
    ``stop_requested()`` turns true on any replica (SIGTERM), all replicas stop at the same
    step, write a checkpoint and raise Preempted. A NaN/inf loss raises NonFiniteLoss
    before anything broken is saved.
    """
    s = setup(cfg, rt, Path(out_dir), resume, stop_requested)
    for epoch in range(s.pos.epoch, cfg.train.epochs):
        run = train_one_epoch(s, epoch)
        end_epoch(s, epoch, run)
    if s.pos.knn_epoch < s.pos.epoch == cfg.train.epochs and resume and s.pos.global_step == s.resumed_at:
        # resumed from the final checkpoint, written before its kNN: the kNN is what is left
        s.writer.write({"type": "epoch", "epoch": s.pos.epoch, "step": s.pos.global_step,
                        "loss": s.pos.final_loss, "knn_top1": evaluate(s, s.pos.epoch - 1),
                        "pixel_knn_top1": s.pixels.top1})
    return finish(s)


def setup(cfg: Config, rt: Runtime, out_dir: Path, resume: str | None,
          stop_requested: Callable[[], bool]) -> Session:
    """Data, model, optimizer, loader and bookkeeping of this replica; the resumed position restored."""
    world = rt.world_size
    validate_world(cfg, world)  # again here: on a pod slice the launcher saw one host of several
    bundle = data.build(cfg)
    model = build_model(cfg, rt)
    optimizer = build_optimizer(cfg, model)
    compile_encoders(cfg, rt, model)
    scaler = rt.grad_scaler(cfg.train.precision)
    rt.manual_seed(cfg.train.seed * 1000 + rt.rank)  # replicas draw different augmentations
    loader = data.pretrain_loader(bundle.pretrain, cfg.train.batch_size // world, rt.rank, world, cfg.train.seed,
                                  cfg.data.workers, cfg.train.max_steps_per_epoch,
                                  pin_memory=rt.device.type == "cuda")
    steps_per_epoch = len(loader)
    pos, carried_sums, restore_rng = Position(), torch.zeros(2), lambda: None
    if resume:
        pos, carried_sums, restore_rng = restore(load_checkpoint(resume), rt, model, optimizer, scaler)
        _check_position(pos, steps_per_epoch, resume)
        if rt.is_master:
            tqdm.write(f"resuming {resume} at epoch {pos.epoch + 1}, step {pos.step}/{steps_per_epoch} "
                       f"(global step {pos.global_step})")
    mirror = records_mirror(cfg, rt, out_dir, resume, pos.global_step)
    if rt.is_master:
        trim_metrics(out_dir, pos.global_step)
    guard = StopGuard(rt, pos.global_step, steps_per_epoch, stop_requested)
    guard.last_checkpoint = resume
    session = Session(
        cfg, rt, out_dir, bundle, model, optimizer, scaler, loader,
        data.device_views(cfg),  # the views' colour ops on the device (uint8 in), or nothing
        steps_per_epoch,
        step_schedule(cfg, model, optimizer, steps_per_epoch),
        CheckpointStore(checkpoint_dir(cfg, out_dir), cfg.checkpoint.keep), pos, carried_sums,
        MetricsWriter(out_dir, enabled=rt.is_master, purge_step=pos.global_step + 1 if resume else None,
                      mirror=mirror),
        CollapseDetector(cfg, model.uniform_loss()), guard,
        GraphWatch(rt), StepProfiler(rt),  # XLA graph hygiene; --profile DIR traces
        resume, pos.global_step, pos.wall_s, PixelReference(rt, bundle, cfg))
    restore_rng()  # last thing before the first step
    return session


def records_mirror(cfg: Config, rt: Runtime, out_dir: Path, resume: str | None,
                   global_step: int) -> RecordsMirror | None:
    """The master's copy of its records beside a gs:// checkpoint.dir (records.py), where every host and
    every resume find them; a resumed run first takes them back. None: the records stay in --out only."""
    url = records_url(checkpoint_dir(cfg, out_dir))
    if url is None or not rt.is_master:
        return None
    mirror = RecordsMirror(out_dir, url)
    restored = bool(resume) and mirror.restore(global_step)
    tqdm.write(f"records in {out_dir}, copied to {url}{' (history restored from there)' if restored else ''}")
    mirror.announce()
    return mirror


def train_one_epoch(s: Session, epoch: int) -> EpochRun:
    """The epoch's remaining steps; loss and accuracy summed on the device, read by closures only."""
    cfg, rt, pos, model, optimizer = s.cfg, s.rt, s.pos, s.model, s.optimizer
    start = pos.step
    lr = lr_at_epoch(cfg.train, epoch)
    set_lr(optimizer, lr)
    s.loader.set_epoch(epoch, start)
    model.train()
    bar = tqdm(total=s.steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
               disable=not rt.is_master, leave=False, dynamic_ncols=True)
    # loss, acc sums; copied from the host so no epoch adds a zeros graph of its own (XLA)
    sums = (s.carried_sums if start else torch.zeros(2)).to(rt.device)
    t0 = time.time()
    s.watch.enter("train")
    for step, (im_q, im_k) in enumerate(rt.device_loader(s.loader), start=start):
        if s.before_step is not None:  # MoCo v3: lr and momentum per step; v1/v2 m_cosine: momentum
            lr = s.before_step(pos.global_step)
        im_q, im_k = s.augment(im_q), s.augment(im_k)
        with rt.autocast(cfg.train.precision):
            loss, stats = model(im_q, im_k)
        optimizer.zero_grad(set_to_none=True)
        rt.backward_step(loss, optimizer, s.scaler)  # all-reduced gradients, then the step
        sums += torch.stack([stats["loss"], stats["acc"]]).float()
        s.guard.observe(stats["loss"])
        pos.step, pos.global_step = step + 1, pos.global_step + 1
        bar.update(1)
        after_step(s, epoch, EpochRun(sums, lr, start, t0), stats, bar)
        s.profiler.step()
    rt.mark_step()
    s.watch.enter("epoch_end")
    bar.close()
    return EpochRun(sums, lr, start, t0)


def after_step(s: Session, epoch: int, run: EpochRun, stats: dict[str, torch.Tensor], bar: tqdm) -> None:
    """A step's bookkeeping: the log closure, the stop poll and a mid-epoch checkpoint (then Preempted on a
    stop). Only at their intervals; nothing here reads the device."""
    cfg, pos = s.cfg, s.pos
    mid_epoch = pos.step < s.steps_per_epoch  # the epoch end decides synchronously
    logging = pos.step % cfg.train.log_every == 0
    polling = pos.global_step % cfg.train.stop_every == 0  # independent of logging
    if logging:
        s.rt.add_step_closure(_log_step, (s.writer, bar, epoch, pos.global_step, run.lr, stats["loss"],
                                          stats["acc"], (pos.step - run.start) * cfg.train.batch_size, run.t0))
    stop = mid_epoch and polling and s.guard.poll()
    every = cfg.checkpoint.every_steps
    saving = mid_epoch and (stop or bool(every and pos.global_step % every == 0))
    s.watch.step(log=logging, poll=polling, checkpoint=saving)  # this step's window ends here
    if saving:
        stop = s.guard.agree() or stop
        path = save(s, run.lr, run.sums)
        if stop:
            bar.close()
            _preempted(path, pos, s.steps_per_epoch)


def end_epoch(s: Session, epoch: int, run: EpochRun) -> None:
    """The epoch's means (one collective, one host read), its checkpoint, kNN, collapse check and record."""
    cfg, rt, pos = s.cfg, s.rt, s.pos
    stop = s.guard.agree()
    epoch_log: dict[str, Any] = {}
    means = rt.all_reduce(run.sums, op="mean")  # one collective per epoch
    if _averaging(cfg, epoch):
        s.model.encoder_avg.update(s.model.encoder_q)
    rt.add_step_closure(_read_epoch, (epoch_log, means, s.steps_per_epoch))
    rt.mark_step()
    wall = time.time() - run.t0
    pos.images_per_s = (pos.step - run.start) * cfg.train.batch_size / max(wall, 1e-9)
    record = {"type": "epoch", "epoch": epoch + 1, "step": pos.global_step, "lr": run.lr,
              "images_per_s": pos.images_per_s, "epoch_s": wall, **epoch_log}
    pos.epoch, pos.step, pos.final_loss = epoch + 1, 0, epoch_log["loss"]
    last = epoch + 1 == cfg.train.epochs
    every = cfg.checkpoint.every
    if stop or (every and ((epoch + 1) % every == 0 or last)):
        # before the kNN: a resumed run never repeats it, nor loses the epoch to it
        path = save(s, run.lr, torch.zeros(2))
        if stop and not last:
            s.writer.write(record)
            s.writer.sync()
            _preempted(path, pos, s.steps_per_epoch)
    if _knn_due(cfg, epoch):
        record["knn_top1"], record["pixel_knn_top1"] = evaluate(s, epoch), s.pixels.top1
    record["collapse"] = s.collapse.check(epoch, epoch_log["loss"])
    s.writer.write(record)
    s.writer.sync()  # the epoch's record reaches the mirror now, not a log interval later
    if rt.is_master:
        knn = f"  knn {pos.knn_top1:.2f}% (pixels {s.pixels.top1:.2f}%)" if "knn_top1" in record else ""
        tqdm.write(f"epoch {epoch + 1}/{cfg.train.epochs}  loss {epoch_log['loss']:.4f}  "
                   f"acc {epoch_log['acc']:.1f}%  lr {run.lr:.4g}  {pos.images_per_s:.0f} img/s{knn}")


def evaluate(s: Session, epoch: int) -> float:
    """kNN on the query or key encoder's features (eval.knn_encoder, knn_layer, knn_centre); every replica
    first takes rank 0's BN statistics, so N replicas score exactly what one would."""
    cfg, rt, pos = s.cfg, s.rt, s.pos
    # fork_rng: evaluating (its DataLoaders draw seeds) must not shift training's RNG stream
    with s.watch.region("knn"), torch.random.fork_rng(devices=[]):
        rt.sync_batchnorm_stats(s.model)
        encoder = monitored_encoder(s.model, cfg.eval.knn_encoder, averaged_yet=_averaging(cfg, epoch))
        features = knn_readout(encoder, cfg.eval.knn_layer)
        pos.knn_top1 = float(knn_accuracy(
            rt, features, s.bundle.bank, s.bundle.test, s.bundle.num_classes, cfg.eval.knn_k,
            cfg.eval.knn_t, cfg.eval.batch_size, cfg.eval.max_bank, cfg.data.workers, cfg.eval.knn_bn,
            cfg.eval.knn_centre))
        s.pixels.measure()
    pos.knn_epoch = epoch + 1
    return pos.knn_top1


def save(s: Session, lr: float, sums: torch.Tensor) -> str:
    """A checkpoint of this position (every replica takes part; the master writes)."""
    s.pos.wall_s = s.wall_before + time.time() - s.session_start
    with s.watch.region("checkpoint"):
        s.rt.sync_batchnorm_stats(s.model)  # a resumed run gives every replica these statistics
        s.guard.last_checkpoint = save_checkpoint(s.rt, s.store, s.cfg, s.model, s.optimizer, s.scaler, s.pos,
                                                  lr, sums)
    s.writer.sync()  # the records up to this checkpoint, beside it
    return s.guard.last_checkpoint


def finish(s: Session) -> dict[str, Any]:
    """The run's summary (identical on every replica), written by the master."""
    cfg, rt, pos = s.cfg, s.rt, s.pos
    s.profiler.stop()
    s.watch.enter("finish")
    pos.wall_s = s.wall_before + time.time() - s.session_start
    summary = {
        "config": cfg.name, "knn_top1": pos.knn_top1, "pixel_knn_top1": s.pixels.top1,
        "epochs": cfg.train.epochs, "steps": pos.global_step,
        "wall_s": pos.wall_s, "images_per_s": pos.images_per_s, "world_size": rt.world_size,
        "backend": rt.name, "final_loss": pos.final_loss, "uniform_loss": s.model.uniform_loss(),
        "skipped_samples": data.skipped_total(rt, s.bundle),  # data.on_bad_sample=skip, all replicas
        "precision": rt.resolve_precision(cfg.train.precision), "xla_graph": s.watch.report(),
    }
    if rt.is_master:
        write_summary(s.out_dir, summary)
    s.writer.close()
    return summary


def _check_position(pos: Position, steps_per_epoch: int, source: str) -> None:
    if pos.step > steps_per_epoch:
        raise UserError(f"checkpoint {source} stopped at step {pos.step} of an epoch, but an epoch "
                        f"now has {steps_per_epoch} steps: the data changed (data.root?)")


def _preempted(path: str, pos: Position, steps_per_epoch: int) -> None:
    raise Preempted(f"stopped on SIGTERM after global step {pos.global_step} (epoch {pos.epoch + 1}, "
                    f"step {pos.step}/{steps_per_epoch}); checkpoint {path}. Rerun the same command "
                    f"with --resume auto to continue")


def _averaging(cfg: Config, epoch: int) -> bool:
    """Whether epoch (0-based) is one of those train.average_from averages."""
    return 0 < cfg.train.average_from <= epoch + 1


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
