"""``python -m moco_xla.eval``: how good is a pre-trained encoder? kNN, linear probe, few labels.

    python -m moco_xla.eval knn     --ckpt runs/digits-X               # newest checkpoint of a run
    python -m moco_xla.eval linear  --ckpt runs/digits-X/checkpoints/ckpt-000000360.pt
    python -m moco_xla.eval semisup --ckpt runs/digits-X --labels 100
    python -m moco_xla.eval linear  --ckpt gs://bucket/run/checkpoints --backend xla --cores 8

The model comes from the checkpoint, and so do the data and evaluation settings unless
``--config`` names a config whose ``data`` and ``eval`` sections replace them (a probe on
another dataset); ``--set`` overrides either (``--set eval.probe.lr=10``). Results go to
``--out`` (default: the run directory that holds the checkpoint): metrics.jsonl,
TensorBoard scalars, plots/*.png and summary.json; a table is printed at the end.
Replicas start as in ``moco_xla.launch`` (TPU cores, GPUs, gloo processes or torchrun).
Exit codes: 0 done, 2 bad input (errors.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.data import Dataset
from tqdm import tqdm

from . import data
from .checkpoint import checkpoint_meta, find_checkpoint
from .config import Config, apply_override, from_dict, load_config, validate
from .data.transforms import pretrain_transform
from .errors import RunStopped, UserError
from .knn import embed, knn_accuracy
from .labelprop import graph_features, propagate
from .plots import SEMISUP_ROWS
from .probe import (DistillSpec, SGDSpec, FrozenProbe, Relabelled, balanced_subset, build_eval_backbone,
                    clean_and_augmented, distill, extract, fit, head_accuracy, holdout_indices, image_accuracy,
                    image_batches, linear_head, load_encoder, paired, pixel_logistic, probe_sgd, read_labels_file,
                    subset, train_classifier, train_labels, train_probe, train_transform, with_transform)
from .report import MetricsWriter, read_summary, write_summary
from .runtime import BACKENDS, Runtime, make_runtime, replicas, resolve_backend

COMMANDS = ("knn", "linear", "semisup")


@dataclass
class Job:
    """What every replica needs (picklable: it crosses process boundaries)."""

    command: str
    ckpt: str
    cfg: Config
    out: str


# ----------------------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see python -m moco_xla.eval --help)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog="python -m moco_xla.eval", description=__doc__.split("\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("command", choices=COMMANDS, help="knn: kNN monitor; linear: linear probe (lincls); "
                   "semisup: few-label study against a supervised baseline")
    p.add_argument("--ckpt", required=True,
                   help="a ckpt-*.pt file, a checkpoint directory or a run directory (newest checkpoint); "
                        "local or gs://")
    p.add_argument("--labels", type=int, default=None, help="semisup: labelled images (eval.semisup.labels)")
    p.add_argument("--labels-file", default=None, metavar="CSV",
                   help="semisup: your own labels instead of the seeded draw, one image a line: "
                        "'index,label' (position in the train split) or 'path,label' (folder datasets); "
                        "# comments and an 'index,label' header allowed (eval.semisup.labels_file)")
    p.add_argument("--config", default=None,
                   help="take the data and eval sections from this config instead of the checkpoint's")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="auto: TPU, then CUDA, then CPU")
    p.add_argument("--cores", type=int, default=None, help="replicas, as for moco_xla.launch")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set eval.probe.epochs=50 (repeatable)")
    p.add_argument("--out", default=None, help="output directory (default: the checkpoint's run directory)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p.parse_args(argv)


def eval_config(ckpt: str, config: str | None, overrides: list[str]) -> Config:
    """The checkpoint's config; ``config`` replaces its data and eval sections; then ``overrides``."""
    saved = checkpoint_meta(ckpt).get("config")
    if not isinstance(saved, dict):
        raise UserError(f"{ckpt} is not a moco_xla checkpoint (no config in it)")
    cfg = from_dict(saved)
    if config is not None:
        other = load_config(config)
        cfg.data, cfg.eval = other.data, other.eval
    for item in overrides:
        apply_override(cfg, item)
    validate(cfg)
    return cfg


def check_job(cfg: Config, command: str, world: int) -> None:
    """Batch splits that depend on the replica count; the study's row list."""
    p, s = cfg.eval.probe, cfg.eval.semisup
    if command == "linear" and p.batch_size % world:
        raise UserError(f"eval.probe.batch_size={p.batch_size} (global) must be divisible by the "
                        f"{world} replicas")
    if command == "semisup":
        selected_rows(s.rows)  # a bad list fails here, before replicas start
    if command == "semisup" and semisup_batch(cfg, world) < world:
        raise UserError(f"eval.semisup.labels={s.labels} gives fewer labelled images than the {world} "
                        f"replicas; use more labels or fewer --cores")


def use_labels_file(cfg: Config, path: str | None, labels: int | None) -> None:
    """Read and check ``--labels-file`` (or eval.semisup.labels_file) before replicas start; its rows set
    eval.semisup.labels."""
    s = cfg.eval.semisup
    if path is not None:
        s.labels_file = str(Path(path).resolve())
    if not s.labels_file:
        return
    from .launch import check_data
    check_data(cfg)
    bundle = data.build(cfg)
    picked, _ = read_labels_file(s.labels_file, bundle.bank, bundle.num_classes, cfg.data.root)
    if labels is not None and labels != len(picked):
        raise UserError(f"--labels {labels} disagrees with the {len(picked)} images of --labels-file "
                        f"{s.labels_file}; pass one of them")
    s.labels = len(picked)


def semisup_batch(cfg: Config, world: int) -> int:
    """The global batch of the few-label rows: at most the labelled set, a multiple of the replicas."""
    s = cfg.eval.semisup
    return min(s.batch_size, s.labels) // world * world


def default_out(ckpt: str, cfg: Config) -> Path:
    """The run directory of a local checkpoint (<run>/checkpoints/ckpt-*.pt), else runs/eval-<name>-<time>."""
    if "://" not in ckpt:
        parent = Path(ckpt).resolve().parent
        return parent.parent if parent.name == "checkpoints" else parent
    return Path("runs") / f"eval-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


# ----------------------------------------------------------------------------- replicas

def encoder(rt: Runtime, job: Job) -> nn.Module:
    """The checkpoint's query backbone on this replica's device, in eval mode."""
    _, backbone = load_encoder(job.ckpt)
    return backbone.to(rt.device).eval()


def random_backbone(cfg: Config, rt: Runtime) -> tuple[nn.Module, int]:
    """The same architecture, freshly initialised with the config's seed (identical on every replica)."""
    torch.manual_seed(cfg.train.seed)
    net, dim = build_eval_backbone(cfg)
    net = net.to(rt.device)
    rt.sync_module(net)
    return net, dim


def run_knn(job: Job, rt: Runtime, writer: MetricsWriter) -> dict[str, Any]:
    cfg, e = job.cfg, job.cfg.eval
    bundle = data.build(cfg)
    top1 = float(knn_accuracy(rt, encoder(rt, job), bundle.bank, bundle.test, bundle.num_classes, e.knn_k,
                              e.knn_t, e.batch_size, e.max_bank, cfg.data.workers))
    writer.write({"type": "knn_eval", "knn_top1": top1, "k": e.knn_k, "t": e.knn_t})
    return {"knn_top1": top1, "knn": {"top1": top1, "k": e.knn_k, "t": e.knn_t, "ckpt": job.ckpt,
                                      "bank_images": len(bundle.bank), "test_images": len(bundle.test)}}


def run_linear(job: Job, rt: Runtime, writer: MetricsWriter) -> dict[str, Any]:
    """MoCo's lincls: a linear layer on the frozen backbone's pooled features."""
    cfg, p = job.cfg, job.cfg.eval.probe
    e, workers, seed = cfg.eval, cfg.data.workers, cfg.train.seed
    bundle = data.build(cfg)
    backbone = encoder(rt, job)
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


@dataclass
class SemisupSplit:
    """Which training images the study labels, which it may use unlabelled, and what it scores on."""

    picked: torch.Tensor      # labelled train indices
    labels: torch.Tensor      # their labels (the dataset's, or the labels file's)
    pool: torch.Tensor        # train indices distillation may use (labelled ones included)
    test: Any                 # the test set, or held-out training images (eval.semisup.holdout)
    scored_on: str


def semisup_labels(cfg: Config, bank, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, labels): the labels file's, else a balanced seeded draw of eval.semisup.labels."""
    s = cfg.eval.semisup
    if s.labels_file:
        return read_labels_file(s.labels_file, bank, classes, cfg.data.root)
    picked = balanced_subset(train_labels(bank), s.labels, classes, s.seed)
    return picked, train_labels(bank)[picked]


def semisup_split(cfg: Config, bundle: data.DataBundle) -> SemisupSplit:
    s = cfg.eval.semisup
    picked, labels = semisup_labels(cfg, bundle.bank, bundle.num_classes)
    n = len(bundle.bank)
    if not s.holdout:
        return SemisupSplit(picked, labels, torch.arange(n), bundle.test, "test")
    held = holdout_indices(n, picked, s.holdout, s.seed + 1000)
    keep = torch.ones(n, dtype=torch.bool)
    keep[held] = False
    return SemisupSplit(picked, labels, keep.nonzero().flatten(), subset(bundle.bank, held),
                        f"holdout ({s.holdout} unlabelled training images)")


def run_semisup(job: Job, rt: Runtime, writer: MetricsWriter) -> dict[str, Any]:
    """N labelled images, nine ways to use them, one test set (the MNIST-with-100-labels study)."""
    cfg, s, d = job.cfg, job.cfg.eval.semisup, job.cfg.eval.semisup.distill
    e, workers, seed = cfg.eval, cfg.data.workers, cfg.train.seed
    bundle = data.build(cfg)
    classes = bundle.num_classes
    split = semisup_split(cfg, bundle)
    labelled = Relabelled(bundle.bank, split.picked, split.labels)
    images = bundle.bank  # what the trained rows see: random crops when eval.semisup.augment
    if s.augment:
        images = with_transform(bundle.bank, train_transform(cfg.data.augment, cfg.data.image_size,
                                                             cfg.model.in_channels))
    shown = Relabelled(images, split.picked, split.labels)
    batch, all_batch = semisup_batch(cfg, rt.world_size), distill_batch(cfg, rt.world_size, len(split.pool))
    label_batch = max(rt.world_size, min(d.label_batch_size, batch) // rt.world_size * rt.world_size)
    chosen = selected_rows(s.rows)
    # progress ticks: distill.steps a student, semisup.steps every other row but the pixel logistic regression
    steps = sum(d.steps if key in STUDENT_ROWS else 0 if key == "pixel_logistic" else s.steps for key in chosen)
    bar = tqdm(total=steps, desc=f"{len(split.picked)} labels", disable=not rt.is_master, dynamic_ncols=True)

    def tick(*_: Any) -> None:
        bar.update(1)

    def probe_row(net: nn.Module) -> torch.Tensor:
        norm = e.probe.normalize
        train = extract(rt, net, labelled, e.batch_size, workers, norm)
        head = train_probe(rt, train, classes, SGDSpec(s.probe_lr), s.steps, 1, batch, seed, tick)
        return head_accuracy(rt, head, extract(rt, net, split.test, e.batch_size, workers, norm))

    def tuned_row(net: nn.Module, dim: int, lr: float) -> tuple[nn.Module, torch.Tensor]:
        batches = image_batches(rt, shown, batch // rt.world_size, seed, workers)
        sgd = SGDSpec(lr, 0.9, s.weight_decay, "cosine")
        model = train_classifier(rt, net, dim, classes, batches, s.steps, sgd, seed, tick)
        return model, image_accuracy(rt, model, split.test, e.batch_size, workers)

    noised = student_images(cfg, bundle.bank, images, d.student_augment)
    pool, noised_labelled = distill_views(cfg, bundle.bank, noised, split)

    def student_row(teacher: nn.Module | None, all_images: Dataset, labelled_images: Dataset, student: nn.Module,
                    dim: int, lr: float) -> torch.Tensor:
        everything = image_batches(rt, all_images, all_batch // rt.world_size, seed + 1, workers)
        batches = paired(everything, image_batches(rt, labelled_images, label_batch // rt.world_size, seed + 2,
                                                   workers))
        sgd = SGDSpec(lr, 0.9, s.weight_decay, "cosine")
        model = distill(rt, teacher, student, dim, classes, batches, d.steps, sgd,
                        DistillSpec(d.temperature, d.label_weight, d.targets), seed, tick)
        return image_accuracy(rt, model, split.test, e.batch_size, workers)

    def propagated_row(features: nn.Module, k: int, student: nn.Module, dim: int, lr: float, augment: str
                       ) -> torch.Tensor:
        """Label propagation on ``features`` over the pool, then a student (noised as ``augment`` says)
        learns the propagated labels."""
        propagated = propagated_labels(rt, features, bundle.bank, split, classes, k, cfg)
        return student_row(None, *propagated_views(cfg, bundle.bank, images, split, propagated, augment), student,
                           dim, lr)

    scratch, dim = random_backbone(cfg, rt)
    lp = s.labelprop
    teachers: dict[str, nn.Module] = {}

    def teacher_row(key: str, net: nn.Module, lr: float) -> torch.Tensor:
        teachers[key], accuracy = tuned_row(net, dim, lr)  # same images, crops and schedule for both
        return accuracy

    # students start where their teachers did: the pre-trained encoder, the same seeded random init
    recipes: dict[str, Callable[[], torch.Tensor]] = {
        "moco_probe": lambda: probe_row(encoder(rt, job)),
        "moco_finetune": lambda: teacher_row("moco_finetune", encoder(rt, job), s.finetune_lr),
        "moco_distill": lambda: student_row(teachers["moco_finetune"], pool, noised_labelled, encoder(rt, job),
                                            dim, d.lr),
        "moco_labelprop": lambda: propagated_row(graph_features(encoder(rt, job), lp.pixel_weight), lp.k,
                                                 encoder(rt, job), dim, d.lr, lp.student_augment),
        "supervised_scratch": lambda: teacher_row("supervised_scratch", scratch, s.lr),
        "scratch_distill": lambda: student_row(teachers["supervised_scratch"], pool, noised_labelled,
                                               random_backbone(cfg, rt)[0], dim, d.scratch_lr),
        "pixel_labelprop": lambda: propagated_row(nn.Flatten(), lp.pixel_k, random_backbone(cfg, rt)[0], dim,
                                                  d.scratch_lr, lp.pixel_student_augment),
        "pixel_logistic": lambda: pixel_logistic(rt, labelled, split.test, s.pixel_c, e.batch_size, workers),
        "random_probe": lambda: probe_row(random_backbone(cfg, rt)[0]),
    }
    rows = {key: recipes[key]() for key in chosen}  # every row seeds its own init and batches
    rt.mark_step()
    bar.close()
    values = {k: float(v) for k, v in rows.items()}  # the study's one host read
    best = max(values, key=values.get)
    n = len(split.picked)
    writer.write({"type": "semisup", "labels": n, "scored_on": split.scored_on, **values}, step=n)
    return {summary_key(cfg): {str(n): {
        "labels": n, "per_class": n / classes, "rows": values, "best": best,
        "steps": s.steps, "augment": s.augment, "seed": s.seed, "labels_file": s.labels_file,
        "ckpt": job.ckpt, "lr": {"probe": s.probe_lr, "finetune": s.finetune_lr, "scratch": s.lr},
        "distill": {**dataclasses.asdict(d), "batch_size": all_batch, "label_batch_size": label_batch,
                    "unlabelled_pool": len(split.pool)},
        "labelprop": dataclasses.asdict(s.labelprop),
        "scored_on": split.scored_on, "test_images": len(split.test)}}}


STUDENT_ROWS = ("moco_distill", "moco_labelprop", "scratch_distill", "pixel_labelprop")  # distill.steps each
TEACHER_ROWS = {"moco_distill": "moco_finetune", "scratch_distill": "supervised_scratch"}  # who trains the teacher


def selected_rows(text: str) -> list[str]:
    """eval.semisup.rows ("all" or comma-separated row keys) as the keys to run, in the table's order; a
    distilled row brings its teacher's row (the teacher is trained there)."""
    if text.strip() == "all":
        return list(SEMISUP_ROWS)
    asked = {key.strip() for key in text.split(",") if key.strip()}
    unknown = sorted(asked - set(SEMISUP_ROWS))
    if unknown or not asked:
        raise UserError(f"eval.semisup.rows has {', '.join(unknown) or 'no row'}; valid: all or a comma-separated "
                        f"list of {', '.join(SEMISUP_ROWS)}")
    asked |= {TEACHER_ROWS[key] for key in asked & set(TEACHER_ROWS)}
    return [key for key in SEMISUP_ROWS if key in asked]


def student_images(cfg: Config, bank, images, augment: str):
    """A student's view of the training images: fine-tuning's (``images``; ``augment`` crop) or the
    checkpoint's MoCo augmentation (pretrain); eval.semisup.distill.student_augment chooses for the
    teachers' students, eval.semisup.labelprop.(pixel_)student_augment for label propagation's."""
    if augment == "crop":
        return images
    return with_transform(bank, pretrain_transform(cfg.data.augment, cfg.data.image_size, cfg.model.in_channels))


def distill_views(cfg: Config, bank, noised, split: SemisupSplit) -> tuple[Dataset, Dataset]:
    """The distillation's (pool, labelled) datasets, the student seeing ``noised`` (student_images);
    the pool yields (teacher's view, student's view) pairs when the teacher sees the clean image."""
    pool = noised  # teacher_view crop: the teacher sees the student's view (SimCLRv2)
    if cfg.eval.semisup.distill.teacher_view == "clean" and noised is not bank:
        pool = clean_and_augmented(bank, noised.transform)
    return subset(pool, split.pool), Relabelled(noised, split.picked, split.labels)


def propagated_views(cfg: Config, bank, images, split: SemisupSplit, propagated: torch.Tensor, augment: str
                     ) -> tuple[Dataset, Dataset]:
    """A label-propagation student's (pool, labelled) datasets: the pool with its ``propagated`` labels
    and the labelled images with theirs, both seen as ``augment`` says (student_images)."""
    seen = student_images(cfg, bank, images, augment)
    return Relabelled(seen, split.pool, propagated), Relabelled(seen, split.picked, split.labels)


def propagated_labels(rt: Runtime, features: nn.Module, bank, split: SemisupSplit, classes: int, k: int,
                      cfg: Config) -> torch.Tensor:
    """Labels for every image of split.pool (host tensor): the labelled ones spread by label propagation
    over ``features``' kNN graph of the pool (clean images; the bank gathered on every replica)."""
    lp = cfg.eval.semisup.labelprop
    feats, _ = embed(rt, features.to(rt.device).eval(), subset(bank, split.pool), cfg.eval.batch_size, 0,
                     cfg.data.workers)
    seeds = torch.searchsorted(split.pool, split.picked).to(rt.device)  # pool is sorted, holds the labelled
    labels = propagate(feats, seeds, split.labels.to(rt.device), classes, k, lp.alpha, lp.iterations, lp.gamma,
                       rt.mark_step)
    return labels.cpu()  # once per row, before its student trains


def summary_key(cfg: Config) -> str:
    """Studies scored on held-out training images are kept apart from those scored on the test set."""
    return "semisup_holdout" if cfg.eval.semisup.holdout else "semisup"


def distill_batch(cfg: Config, world: int, pool: int) -> int:
    """The global batch of images from the whole train set: at most the pool, a multiple of the replicas."""
    return min(cfg.eval.semisup.distill.batch_size, pool) // world * world


RUNNERS: dict[str, Callable[[Job, Runtime, MetricsWriter], dict[str, Any]]] = {
    "knn": run_knn, "linear": run_linear, "semisup": run_semisup}


def run_replica(backend: str, rank: int, world: int, local_rank: int, job: Job) -> dict[str, Any]:
    """The body of every replica: make the runtime, evaluate, write the summary on the master."""
    rt = make_runtime(backend, rank, world, local_rank)
    try:
        rt.manual_seed(job.cfg.train.seed)  # a private stream where replica threads share a process
        writer = MetricsWriter(job.out, enabled=rt.is_master)
        result = RUNNERS[job.command](job, rt, writer)
        if rt.is_master:
            write_summary(job.out, result)
        writer.close()  # after the summary: the plots read it
        return result
    finally:
        rt.shutdown()


def start(backend: str, cores: int, job: Job) -> None:
    """Run ``cores`` replicas of ``backend`` on this host (or be one replica under torchrun)."""
    replicas.start(backend, cores, run_replica, (job,))


# ----------------------------------------------------------------------------- report

def print_table(command: str, out: Path, cfg: Config) -> None:
    """The command's numbers from summary.json, as a short table."""
    s = read_summary(out)
    if command == "knn" and "knn" in s:
        k = s["knn"]
        print(f"  kNN top-1 (k={k['k']}, t={k['t']}): {k['top1']:.2f}%  "
              f"({k['bank_images']} bank / {k['test_images']} test images)")
    elif command == "linear" and "linear" in s:
        lin = s["linear"]
        print(f"  linear probe top-1: {lin['top1']:.2f}%  ({lin['epochs']} epochs, lr {lin['lr']:g}, "
              f"{lin['test_images']} test images)")
    elif command == "semisup":
        study = (s.get(summary_key(cfg)) or {}).get(str(cfg.eval.semisup.labels))
        if not study:
            return
        where = study.get("scored_on", "test")
        where = "test" if where == "test" else where.split(" ", 1)[0]
        source = f"from {study['labels_file']}" if study.get("labels_file") else f"draw {study['seed']}"
        print(f"  {study['labels']} labelled images ({study['per_class']:g} per class, {source}); "
              f"{where} top-1 on {study['test_images']} images:")
        shown = {key: title for key, title in SEMISUP_ROWS.items() if key in study["rows"]}
        pixels = study.get("labelprop", {}).get("pixel_weight", 0)
        if pixels and "moco_labelprop" in shown:  # the graph joined MoCo's features with the raw pixels
            shown["moco_labelprop"] = f"MoCo + {pixels:g} pixels label propagation + distilled"
        width = max(map(len, shown.values()))
        for key, title in shown.items():
            tied = study["rows"][key] == study["rows"][study["best"]]  # a tie marks every row that has it
            mark = "  <- best" if tied else ""
            print(f"    {title:<{width}} {study['rows'][key]:6.2f}%{mark}")
    print(f"  results in {out} (summary.json, metrics.jsonl, plots/, tensorboard/)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
        ckpt = find_checkpoint(args.ckpt)
        overrides = list(args.overrides)
        if args.labels is not None:
            overrides.append(f"eval.semisup.labels={args.labels}")
        cfg = eval_config(ckpt, args.config, overrides)
        if args.command == "semisup":
            use_labels_file(cfg, args.labels_file, args.labels)
        backend = resolve_backend(args.backend)
        cores, world, master = _world(backend, args.cores)
        check_job(cfg, args.command, world)
        from .launch import check_data
        check_data(cfg)
        out = Path(args.out) if args.out else default_out(ckpt, cfg)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; pass a directory")
        if master:
            out.mkdir(parents=True, exist_ok=True)
            print(f"moco_xla.eval {args.command}: {ckpt} on {backend} x{world} -> {out}", flush=True)
        start(backend, cores, Job(args.command, ckpt, cfg, str(out)))
    except RunStopped as e:
        if "--debug" in argv:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    if master:
        print_table(args.command, out, cfg)
    return 0


def _world(backend: str, cores: int | None) -> tuple[int, int, bool]:
    """(replicas on this host, replicas in all, whether this process reports): as for launch."""
    from .launch import replica_count, world_size
    from .runtime.dist import env_rank
    env = env_rank()
    if env is None:
        cores = replica_count(backend, cores)
        return cores, world_size(backend, cores), True
    if backend == "xla":
        raise UserError("torchrun drives the cpu/cuda backends; on TPUs use --cores (xmp.spawn)")
    if cores is not None and cores != env[1]:
        raise UserError(f"--cores {cores} disagrees with torchrun's WORLD_SIZE={env[1]}")
    return env[1], env[1], env[0] == 0


if __name__ == "__main__":
    sys.exit(main())
