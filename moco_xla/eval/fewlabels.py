"""The few-label study (``eval semisup``): N labelled images, every row of rows.py, one test set.

One pass over the selected rows in the catalogue's order: each row first chooses its setting by
cross-validation on the N labelled images alone (``choose``; select.py), then starts from its own
copy of the checkpoint's encoder or of the seeded random one (read and built once per study), is
trained by the function of its kind below, and leaves one device scalar, its top-1. Teachers are
kept for the distilled rows after them. The scalars are read once, at the end (the choices once
per row).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from .. import data
from ..config import Config, DistillConfig
from ..data.subsets import Relabelled, at_stored_size, subset, with_transform
from ..data.transforms import train_transform
from ..errors import UserError
from ..report import MetricsWriter
from ..runtime import Runtime
from ..schedule import SGDSpec
from .distill import DistillSpec, distill, paired
from .encoder import Encoders
from .fewlabels_split import (SemisupSplit, distill_batch, distill_views, label_batch, pool_features,
                              propagated_labels, propagated_views, round_to_replicas, semisup_batch, semisup_split,
                              student_images, summary_key)
from .fit import image_accuracy, image_batches, train_classifier
from .labelprop import graph_features
from .probe import extract, head_accuracy, pixel_logistic, train_probe
from .rows import Row, margins, row_lr, row_steps, selected_rows, setting_value, title, uses_pixels
from .select import Choice, cross_validate, fixed, label_folds, with_setting


@dataclass
class Study:
    """What every row of one study shares: the replicas, the images, the global batches, the progress."""

    rt: Runtime
    cfg: Config
    classes: int
    split: SemisupSplit
    bank: Dataset          # the train split, eval transform
    pixel_bank: Dataset    # the same images as the raw-pixel rows read them (eval.semisup.pixel_input)
    images: Dataset        # what the trained rows see: random crops when eval.semisup.augment
    batch: int             # the labelled rows' global batch
    all_batch: int         # distillation's batch of images from the whole pool
    label_batch: int       # distillation's batch of labelled images
    tick: Callable[..., None] = lambda *_: None  # called once per optimisation step (the progress bar)

    @property
    def labelled(self) -> Relabelled:
        return Relabelled(self.bank, self.split.picked, self.split.labels)

    @property
    def seed(self) -> int:
        return self.cfg.train.seed

    @property
    def workers(self) -> int:
        return self.cfg.data.workers

    def pixel_view(self, ds: Dataset) -> Dataset:
        """``ds`` (the test set, or images of the bank) as the raw-pixel rows read it (pixel_bank's)."""
        if self.pixel_bank is self.bank:
            return ds
        if isinstance(ds, Relabelled) and ds.ds is self.bank:  # labelled images, a fold of them
            return Relabelled(self.pixel_bank, torch.tensor(ds.indices), torch.tensor(ds.labels))
        if isinstance(ds, Subset) and ds.dataset is self.bank:  # eval.semisup.holdout's images
            return subset(self.pixel_bank, torch.tensor(ds.indices))
        return stored(self.cfg, ds)

    def accuracy(self, model: nn.Module) -> torch.Tensor:
        return image_accuracy(self.rt, model, self.split.test, self.cfg.eval.batch_size, self.workers)

    def with_semisup(self, semisup) -> Study:
        """The same study with eval.semisup replaced (a row's chosen setting)."""
        e = dataclasses.replace(self.cfg.eval, semisup=semisup)
        return dataclasses.replace(self, cfg=dataclasses.replace(self.cfg, eval=e))


def stored(cfg: Config, ds: Dataset) -> Dataset:
    """``ds`` at its images' stored size where the run upsamples them (data.subsets.at_stored_size): the
    raw-pixel rows' input under eval.semisup.pixel_input=stored, as the kNN monitor's pixel reference."""
    return at_stored_size(ds, cfg.data.augment, cfg.data.image_size, cfg.model.in_channels)


def prepare(cfg: Config, rt: Runtime, bundle: data.DataBundle) -> Study:
    s = cfg.eval.semisup
    split = semisup_split(cfg, bundle)
    images = bundle.bank
    if s.augment:
        images = with_transform(bundle.bank, train_transform(cfg.data.augment, cfg.data.image_size,
                                                             cfg.model.in_channels))
    batch = semisup_batch(cfg, rt.world_size)
    pixel_bank = stored(cfg, bundle.bank) if s.pixel_input == "stored" else bundle.bank
    return Study(rt, cfg, bundle.num_classes, split, bundle.bank, pixel_bank, images, batch,
                 distill_batch(cfg, rt.world_size, len(split.pool)),
                 label_batch(s.distill.label_batch_size, batch, rt.world_size))


# ----------------------------------------------------------------------------- one function per row kind

def probe_row(st: Study, net: nn.Module, lr: float, steps: int, normalize: bool) -> torch.Tensor:
    """A linear probe on the frozen ``net``'s features of the labelled images."""
    e, rt = st.cfg.eval, st.rt
    train = extract(rt, net, st.labelled, e.batch_size, st.workers, normalize)
    head = train_probe(rt, train, st.classes, SGDSpec(lr), steps, 1, st.batch, st.seed, st.tick)
    return head_accuracy(rt, head, extract(rt, net, st.split.test, e.batch_size, st.workers, normalize))


def finetune_row(st: Study, net: nn.Module, dim: int, lr: float, steps: int, weight_decay: float
                 ) -> tuple[nn.Module, torch.Tensor]:
    """``net`` + a head trained end to end on the labelled images (fine-tuning, or from scratch)."""
    shown = Relabelled(st.images, st.split.picked, st.split.labels)
    batches = image_batches(st.rt, shown, st.batch // st.rt.world_size, st.seed, st.workers)
    sgd = SGDSpec(lr, 0.9, weight_decay, "cosine")
    model = train_classifier(st.rt, net, dim, st.classes, batches, steps, sgd, st.seed, st.tick)
    return model, st.accuracy(model)


def student_row(st: Study, teacher: nn.Module | None, pool: Dataset, labelled: Dataset, net: nn.Module, dim: int,
                lr: float, d: DistillConfig, weight_decay: float) -> torch.Tensor:
    """``net`` + a head learning the ``teacher``'s predictions on ``pool`` (or the labels ``pool`` carries
    when there is no teacher) and the ``labelled`` images' labels."""
    rt, per = st.rt, st.rt.world_size
    everything = image_batches(rt, pool, st.all_batch // per, st.seed + 1, st.workers)
    batches = paired(everything, image_batches(rt, labelled, st.label_batch // per, st.seed + 2, st.workers))
    sgd = SGDSpec(lr, 0.9, weight_decay, "cosine")
    model = distill(rt, teacher, net, dim, st.classes, batches, d.steps, sgd,
                    DistillSpec(d.temperature, d.label_weight, d.targets), st.seed, st.tick)
    return st.accuracy(model)


def distill_row(st: Study, teacher: nn.Module, net: nn.Module, dim: int, lr: float, d: DistillConfig,
                weight_decay: float) -> torch.Tensor:
    """A student of a trained row, noised as eval.semisup.distill.student_augment says."""
    noised = student_images(st.cfg, st.bank, st.images, d.student_augment)
    pool, labelled = distill_views(st.cfg, st.bank, noised, st.split)
    return student_row(st, teacher, pool, labelled, net, dim, lr, d, weight_decay)


def labelprop_row(st: Study, graph: Graph, net: nn.Module, dim: int, lr: float, d: DistillConfig,
                  weight_decay: float) -> torch.Tensor:
    """Label propagation on ``graph``'s features of the pool, then a student (noised as the graph's
    ``augment`` says) learns the propagated labels."""
    propagated = propagated_labels(st.rt, graph.features, graph.bank, st.split, st.classes, graph.k, st.cfg)
    pool, labelled = propagated_views(st.cfg, st.bank, st.images, st.split, propagated, graph.augment)
    return student_row(st, None, pool, labelled, net, dim, lr, d, weight_decay)


def logistic_row(st: Study, c: float) -> torch.Tensor:
    """Logistic regression on the labelled images' raw pixels (scikit-learn, on the host)."""
    return pixel_logistic(st.rt, st.pixel_view(st.labelled), st.pixel_view(st.split.test), c,
                          st.cfg.eval.batch_size, st.workers)


def run_row(row: Row, st: Study, encoders: Encoders, trained: dict[str, nn.Module]) -> torch.Tensor:
    """The row's top-1 (device scalar); a fine-tuned row's model is kept in ``trained`` for its students."""
    s = st.cfg.eval.semisup
    if row.kind == "logistic":
        return logistic_row(st, s.pixel_c)
    net = encoders.pretrained(st.rt) if row.start == "moco" else encoders.random(st.rt)
    lr, dim = row_lr(row, s), encoders.dim
    if row.kind == "probe":
        return probe_row(st, net, lr, s.steps, st.cfg.eval.probe.normalize)
    if row.kind == "finetune":
        trained[row.key], accuracy = finetune_row(st, net, dim, lr, s.steps, s.weight_decay)
        return accuracy
    if row.kind == "distill":
        return distill_row(st, trained[row.teacher], net, dim, lr, s.distill, s.weight_decay)
    return labelprop_row(st, graph_for(row, st, encoders), net, dim, lr, s.distill, s.weight_decay)


class Graph(NamedTuple):
    """A label-propagation row's graph: the features it is built on, the images they read, its k, and the
    augmentation its student sees."""
    features: nn.Module
    bank: Dataset
    k: int
    augment: str


def graph_for(row: Row, st: Study, encoders: Encoders) -> Graph:
    """The graph of a label-propagation row: MoCo's features of the bank, or its raw pixels (pixel_bank)."""
    lp = st.cfg.eval.semisup.labelprop
    if row.graph == "moco":
        return Graph(graph_features(encoders.pretrained(st.rt), lp.pixel_weight), st.bank, lp.k, lp.student_augment)
    return Graph(nn.Flatten(), st.pixel_bank, lp.pixel_k, lp.pixel_student_augment)


# ----------------------------------------------------------------------------- choosing a row's setting

def fold_study(st: Study, held: torch.Tensor, batch: int) -> Study:
    """The study with the labelled images outside positions ``held`` as its labels and the ``held`` ones
    (with their labels) as its test set; the unlabelled pool unchanged."""
    sp = st.split
    keep = torch.ones(len(sp.picked), dtype=torch.bool)
    keep[held] = False
    split = SemisupSplit(sp.picked[keep], sp.labels[keep], sp.pool,
                         Relabelled(st.bank, sp.picked[held], sp.labels[held]), "a held-out fold of the labels")
    d = st.cfg.eval.semisup.distill
    return dataclasses.replace(st, split=split, batch=batch,
                               label_batch=label_batch(d.label_batch_size, batch, st.rt.world_size))


def propagation_accuracy(row: Row, fold: Study, encoders: Encoders, held: torch.Tensor,
                         everything: SemisupSplit, feats: torch.Tensor) -> torch.Tensor:
    """Top-1 (percent) of the labels ``row``'s graph (on the pool's ``feats``) propagates to the held-out
    fold's labelled images."""
    graph = graph_for(row, fold, encoders)
    propagated = propagated_labels(fold.rt, graph.features, graph.bank, fold.split, fold.classes, graph.k, fold.cfg,
                                   feats)
    at = torch.searchsorted(fold.split.pool, everything.picked[held])
    return (propagated[at] == everything.labels[held]).float().mean() * 100.0


def choose(row: Row, st: Study, encoders: Encoders) -> Choice:
    """The row's setting chosen by cross-validation on the study's labelled images (select.py): trained
    rows by the held-out fold's top-1, label propagation by its propagated labels there."""
    s = st.cfg.eval.semisup
    folds = label_folds(st.split.labels, s.select.folds, s.seed)
    batch = round_to_replicas(s.batch_size, len(st.split.picked) - max(map(len, folds)), st.rt.world_size)
    if batch < st.rt.world_size:
        raise UserError(f"{len(st.split.picked)} labels are too few for {s.select.folds}-fold selection on "
                        f"{st.rt.world_size} replicas; lower eval.semisup.select.folds (0: no selection)")

    feats = None
    if row.kind == "labelprop":  # the graph's features do not depend on k nor on the fold: computed once
        graph = graph_for(row, st, encoders)
        feats = pool_features(st.rt, graph.features, graph.bank, st.split, st.cfg)

    def score(value, held: torch.Tensor) -> torch.Tensor:
        fold = fold_study(st.with_semisup(with_setting(s, row.setting, value)), held, batch)
        st.rt.manual_seed(st.seed)
        if row.kind == "labelprop":
            return propagation_accuracy(row, fold, encoders, held, st.split, feats)
        return run_row(row, fold, encoders, {})

    scored_by = ("propagated labels on the held-out fold" if row.kind == "labelprop"
                 else "top-1 on the held-out fold")
    return cross_validate(row.setting, list(getattr(s.select, row.grid)), folds, scored_by, score)


def chosen_study(row: Row, st: Study, encoders: Encoders) -> tuple[Study, dict[str, Any]]:
    """The study the row runs in (its setting chosen, when it has one and selection is on) and the record of
    the choice."""
    s = st.cfg.eval.semisup
    if not row.grid or s.select.folds == 0:
        key = row.setting or row.lr  # every row has one or the other (rows.py)
        return st, fixed(key, setting_value(s, key))
    choice = choose(row, st, encoders)
    return st.with_semisup(with_setting(s, row.setting, choice.chosen)), choice.to_dict()


# ----------------------------------------------------------------------------- the study

def run_semisup(job, rt: Runtime, writer: MetricsWriter) -> dict[str, Any]:
    """Every selected row on the same labelled images; the rows' top-1 in summary.json and metrics.jsonl."""
    cfg, s = job.cfg, job.cfg.eval.semisup
    rows = selected_rows(s.rows)
    st = prepare(cfg, rt, data.build(cfg))
    bar = tqdm(total=sum(row_steps(row, s) for row in rows), desc=f"{len(st.split.picked)} labels",
               disable=not rt.is_master, dynamic_ncols=True)
    st.tick = lambda *_: bar.update(1)
    encoders, trained, results, selection = Encoders(cfg, job.ckpt), {}, {}, {}
    for row in rows:
        row_st, selection[row.key] = chosen_study(row, st, encoders)
        rt.manual_seed(cfg.train.seed)  # a row's randomness comes from the seed, not from the rows before it
        results[row.key] = run_row(row, row_st, encoders, trained)
    rt.mark_step()
    bar.close()
    values = {k: float(v) for k, v in results.items()}  # the study's one host read
    n = len(st.split.picked)
    writer.write({"type": "semisup", "labels": n, "scored_on": st.split.scored_on, **values}, step=n)
    return {summary_key(cfg): {str(n): study_summary(cfg, st, values, job.ckpt, selection)}}


def study_summary(cfg: Config, st: Study, values: dict[str, float], ckpt: str, selection: dict[str, dict]
                  ) -> dict[str, Any]:
    """The study's rows, names and margins (rows.margins), and the settings behind them; ``titles`` names
    every row as the table does, ``raw_pixels`` lists the rows that see the raw pixels, ``selection`` what
    each row chose and on what evidence."""
    s, d, n = cfg.eval.semisup, cfg.eval.semisup.distill, len(st.split.picked)
    titles = {key: title(key, s.labelprop.pixel_weight) for key in values}
    return {
        "labels": n, "per_class": n / st.classes, "rows": values, "best": max(values, key=values.get),
        "titles": titles, "raw_pixels": [key for key in values if uses_pixels(key, s.labelprop.pixel_weight)],
        "margins": margins(values, titles),
        "steps": s.steps, "augment": s.augment, "seed": s.seed, "labels_file": s.labels_file,
        "pixel_input": s.pixel_input, "pixel_size": int(st.pixel_bank[0][0].shape[-1]),
        "ckpt": ckpt, "lr": {"probe": s.probe_lr, "finetune": s.finetune_lr, "scratch": s.lr},
        "distill": {**dataclasses.asdict(d), "batch_size": st.all_batch, "label_batch_size": st.label_batch,
                    "unlabelled_pool": len(st.split.pool)},
        "labelprop": dataclasses.asdict(s.labelprop),
        "select": dataclasses.asdict(s.select), "selection": selection,
        "scored_on": st.split.scored_on, "test_images": len(st.split.test),
        "diagnostic": bool(s.holdout), "diagnostic_note": HOLDOUT_NOTE if s.holdout else ""}


HOLDOUT_NOTE = ("eval.semisup.holdout: scored on unlabelled held-out training images for method development; "
                "a diagnostic, not a reported figure (the labels scoring it are more than the study's N)")
