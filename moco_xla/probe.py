"""Classifiers on top of an encoder: linear probe, fine-tuning, from-scratch baseline, raw pixels.

These are the supervised protocols a MoCo encoder is judged by. The linear probe
follows MoCo's lincls: the backbone is frozen with BN in eval mode, one linear
layer (weights N(0, 0.01), bias 0) is trained on its pooled features with SGD at
a large learning rate and a step or cosine schedule. Every trainer runs on every
replica through the Runtime: each replica draws its own share of every global
batch, ``rt.optimizer_step`` averages the gradients, and losses stay on the
device until a step closure reads them once per epoch.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.transforms import v2

from . import data
from .checkpoint import load_checkpoint
from .config import Config, from_dict
from .data.transforms import CleanAndAugmented, normalize_for
from .errors import UserError
from .models import build_backbone
from .optim import prime_momentum
from .runtime import Runtime
from .vit import build_vit, is_vit

BACKBONE_PREFIX = "encoder_q.backbone."
Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------- encoders

def build_eval_backbone(cfg: Config) -> tuple[nn.Module, int]:
    """The config's backbone with plain BN (Split/Sync BN only matter while pre-training)."""
    m = cfg.model
    if is_vit(m.arch):  # MoCo v3's ViTs (no BN in the backbone)
        return build_vit(m.arch, cfg.data.image_size, m.patch_size, m.in_channels, m.width, m.stop_grad_conv1)
    return build_backbone(m.arch, m.in_channels, m.small_stem, m.width, nn.BatchNorm2d)


def load_encoder(ckpt_path: str) -> tuple[Config, nn.Module]:
    """(config it was trained with, query backbone on the CPU) of a checkpoint, local or gs://."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = from_dict(ckpt["config"])
    backbone, _ = build_eval_backbone(cfg)
    load_backbone(backbone, ckpt["model"], ckpt_path)
    return cfg, backbone


def load_backbone(backbone: nn.Module, model_state: dict, source: str) -> None:
    """Copy ``encoder_q.backbone.*`` of a MoCo state dict into ``backbone``; UserError on mismatch."""
    state = {k[len(BACKBONE_PREFIX):]: v for k, v in model_state.items() if k.startswith(BACKBONE_PREFIX)}
    if not state:
        raise UserError(f"checkpoint {source} holds no {BACKBONE_PREFIX}* weights: not a MoCo encoder")
    try:
        backbone.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"checkpoint {source} does not fit the configured model ({first}); "
                        f"leave model.* as the checkpoint has it") from None


# ----------------------------------------------------------------------------- schedules

@dataclass
class SGDSpec:
    """Plain SGD with momentum and a per-epoch schedule (milestones as fractions of training)."""

    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"                      # cosine | step | constant
    milestones: tuple[float, ...] = ()            # step: lr *= 0.1 from each fraction on

    def lr_at(self, progress: float) -> float:
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.schedule == "step":
            return self.lr * 0.1 ** sum(progress >= m - 1e-9 for m in self.milestones)
        return self.lr

    def optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.SGD:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


def probe_sgd(cfg: Config) -> SGDSpec:
    p = cfg.eval.probe
    return SGDSpec(p.lr, p.momentum, p.weight_decay, p.schedule, tuple(s / p.epochs for s in p.lr_steps))


# ----------------------------------------------------------------------------- training loop

def classify_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of ``model`` on an (images, labels) batch."""
    x, y = batch
    return F.cross_entropy(model(x).float(), y)


def fit(rt: Runtime, model: nn.Module, params: list[nn.Parameter], batches: Iterator, epochs: int,
        steps_per_epoch: int, sgd: SGDSpec,
        on_epoch: Callable[[int, float, torch.Tensor], None] | None = None,
        loss_fn: Callable[[nn.Module, tuple], torch.Tensor] = classify_loss) -> None:
    """SGD on ``loss_fn(model, batch)`` for ``epochs`` x ``steps_per_epoch`` of this replica's ``batches``.

    The learning rate changes once per epoch (a Python scalar: no recompilation on XLA).
    ``on_epoch(epoch, lr, mean_loss)`` gets the epoch's mean loss as a device tensor.
    """
    optimizer = sgd.optimizer(params)
    prime_momentum(optimizer)  # step 1 runs the steady graph
    for epoch in range(epochs):
        lr = sgd.lr_at(epoch / epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # host data, not a graph node; shape [1]: torch_xla folds a 0-d host zero into the graph
        loss_sum = torch.zeros(1).to(rt.device)
        for _ in range(steps_per_epoch):
            loss = loss_fn(model, next(batches))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            rt.optimizer_step(optimizer)
            loss_sum += loss.detach()  # inside the step graph
            rt.mark_step()
        if on_epoch is not None:
            on_epoch(epoch, lr, loss_sum[0] / steps_per_epoch)
            rt.mark_step()  # the epoch's report is a graph of its own, not folded into the next step's


def linear_head(dim: int, classes: int, rt: Runtime, seed: int = 0) -> nn.Linear:
    """lincls's head: weights N(0, 0.01), bias 0; the same on every replica."""
    torch.manual_seed(seed)
    head = nn.Linear(dim, classes)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    head = head.to(rt.device)
    rt.sync_module(head)
    return head


# ----------------------------------------------------------------------------- frozen features

@dataclass
class Features:
    """This replica's share of a dataset's frozen features: rows [0, count) are real, the rest padding."""

    x: torch.Tensor        # [per, D] on the device
    y: torch.Tensor        # [per]
    valid: torch.Tensor    # [per] bool
    count: int             # real rows on this replica
    total: int             # real rows over all replicas


@torch.no_grad()
def extract(rt: Runtime, net: nn.Module, ds, batch: int, workers: int = 0, normalize: bool = False
            ) -> Features:
    """Pooled features of ``ds`` (eval transform, optionally L2-normalised) split across replicas.

    Keeping them sharded bounds memory at 1/world of the dataset per replica
    (ImageNet: 10 GB of fp32 features in all), which a gathered bank would not.
    """
    was_training = net.training
    net.eval()
    xs, ys, vs = [], [], []
    for x, y, valid in rt.device_loader(data.eval_loader(ds, batch, rt.rank, rt.world_size, workers)):
        f = net(x).float()
        xs.append(F.normalize(f, dim=1) if normalize else f)
        ys.append(y)
        vs.append(valid)
    net.train(was_training)
    n = len(ds)
    count = len(range(rt.rank, n, rt.world_size))  # eval_loader puts the real samples first
    return Features(torch.cat(xs), torch.cat(ys), torch.cat(vs), count, n)


def feature_batches(f: Features, per: int, seed: int, device: torch.device) -> Batches:
    """Endless batches of ``per`` real rows, a fresh seeded permutation of them every pass."""
    for idx in index_stream(f.count, per, seed):
        idx = idx.to(device)  # a host-to-device copy: the graph is the same every step
        yield f.x.index_select(0, idx), f.y.index_select(0, idx)


def index_stream(n: int, per: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless [per] index batches: seeded permutations of range(n) laid end to end."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.empty(0, dtype=torch.long)
    while True:
        while len(buf) < per:
            buf = torch.cat([buf, torch.randperm(n, generator=g)])
        yield buf[:per]
        buf = buf[per:]


@torch.no_grad()
def head_accuracy(rt: Runtime, head: nn.Module, f: Features) -> torch.Tensor:
    """Top-1 (percent, device scalar) of ``head`` on features split across replicas."""
    correct = ((head(f.x).argmax(dim=1) == f.y) & f.valid).sum().float()
    return rt.all_reduce(correct, op="sum") * (100.0 / f.total)


def train_probe(rt: Runtime, train: Features, classes: int, sgd: SGDSpec, epochs: int, steps_per_epoch: int,
                batch: int, seed: int = 0,
                on_epoch: Callable[[int, float, torch.Tensor, nn.Linear], None] | None = None) -> nn.Linear:
    """A linear classifier on frozen features; ``batch`` is global."""
    head = linear_head(train.x.shape[1], classes, rt, seed)
    batches = feature_batches(train, batch // rt.world_size, seed * 1000 + rt.rank, rt.device)
    hook = None if on_epoch is None else (lambda e, lr, loss: on_epoch(e, lr, loss, head))
    fit(rt, head, list(head.parameters()), batches, epochs, steps_per_epoch, sgd, hook)
    return head


class FrozenProbe(nn.Module):
    """Frozen backbone (eval-mode BN, no gradients) + trainable linear head, for augmented probes."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, normalize: bool = False) -> None:
        super().__init__()
        self.backbone, self.head, self.normalize = backbone, head, normalize
        for p in backbone.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenProbe:
        super().train(mode)
        self.backbone.eval()  # BN keeps its pre-trained statistics
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.backbone(x).float()
            if self.normalize:
                feats = F.normalize(feats, dim=1)
        return self.head(feats)


# ----------------------------------------------------------------------------- images

def train_transform(preset: str, size: int, channels: int) -> v2.Compose:
    """The supervised augmentation (lincls, fine-tuning, from-scratch): crops, flips where they keep the class."""
    gray = [v2.Grayscale(num_output_channels=channels)] if channels == 1 else []
    if preset.startswith(("digits", "handwriting")):  # no flips: a flipped digit is another digit; the same crops for every
        # digits preset, so rows on checkpoints pre-trained with other digit augmentations stay comparable
        ops = [v2.RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(0.8, 1.25), antialias=True)]
    elif preset.startswith("small"):  # CIFAR: pad-and-crop plus flip
        ops = [v2.Resize(size, antialias=True), v2.RandomCrop(size, padding=max(1, size // 8)),
               v2.RandomHorizontalFlip()]
    else:  # ImageNet lincls
        ops = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), *gray, *ops,
                       normalize_for(channels, preset)])


def with_transform(ds, transform: Callable):
    """The same images as a DataBundle's ``bank`` (train split) under another transform."""
    if isinstance(ds, data.ShardSet):
        return dataclasses.replace(ds, transform=transform)
    if not hasattr(ds, "base"):
        raise UserError(f"cannot re-transform a {type(ds).__name__}; expected a data.build() dataset")
    return type(ds)(ds.base, transform, ds.num_classes, ds.skips)


def image_batches(rt: Runtime, ds, per: int, seed: int, workers: int = 0) -> Batches:
    """Endless shuffled (image, label) batches of ``per`` from this replica's part of ``ds``, on the device."""
    if isinstance(ds, data.ShardSet):
        from .data.streams import PretrainStream
        steps = max(1, len(ds) // (per * rt.world_size))
        stream = PretrainStream(ds, rt.rank, rt.world_size, per, steps, seed)
        loader = DataLoader(stream, batch_size=per, num_workers=workers, persistent_workers=workers > 0)
        set_epoch = stream.set_epoch
    else:
        sampler = DistributedSampler(ds, num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=seed)
        if len(sampler) < per:
            raise UserError(f"{len(ds)} images cannot fill a batch of {per} per replica")
        loader = DataLoader(ds, batch_size=per, sampler=sampler, drop_last=True, num_workers=workers,
                            persistent_workers=workers > 0)
        set_epoch = sampler.set_epoch
    for epoch in itertools.count():
        set_epoch(epoch)
        for x, y in rt.device_loader(loader):
            yield x, y


@torch.no_grad()
def image_accuracy(rt: Runtime, model: nn.Module, ds, batch: int, workers: int = 0) -> torch.Tensor:
    """Top-1 (percent, device scalar) of an image classifier on ``ds``, split across replicas."""
    model.eval()
    correct = torch.zeros((), device=rt.device)
    for x, y, valid in rt.device_loader(data.eval_loader(ds, batch, rt.rank, rt.world_size, workers)):
        correct += ((model(x).argmax(dim=1) == y) & valid).sum()
    return rt.all_reduce(correct, op="sum") * (100.0 / len(ds))


def train_classifier(rt: Runtime, backbone: nn.Module, feat_dim: int, classes: int, batches: Batches,
                     steps: int, sgd: SGDSpec, seed: int = 0,
                     on_epoch: Callable[[int, float, torch.Tensor], None] | None = None) -> nn.Module:
    """Backbone + linear head trained end to end (fine-tuning, or from scratch on a fresh backbone).

    BN runs in training mode on each replica's batch; the buffers are taken from the master
    afterwards so every replica evaluates the same model.
    """
    model = nn.Sequential(backbone.to(rt.device), linear_head(feat_dim, classes, rt, seed)).train()
    rt.sync_module(model)
    fit(rt, model, list(model.parameters()), batches, steps, 1, sgd, on_epoch)
    rt.sync_module(model)
    return model


# ----------------------------------------------------------------------------- distillation

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


def clean_and_augmented(ds, augment: Callable):
    """``ds`` (a data.build() dataset, eval transform) yielding ((clean image, ``augment``ed image), label)
    from one read of each sample: the teacher's and the student's views for Noisy Student."""
    return with_transform(ds, CleanAndAugmented(ds.transform, augment))


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


# ----------------------------------------------------------------------------- raw pixels

def pixel_logistic(rt: Runtime, train_ds: Dataset, test_ds, c: float, batch: int, workers: int = 0
                   ) -> torch.Tensor:
    """Top-1 (percent, device scalar) of a logistic regression on standardised raw pixels.

    The classic "is the encoder worth it" reference. scikit-learn fits it on the host (the
    labelled set is small); each replica scores its share of the test set.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xs, ys = zip(*(train_ds[i] for i in range(len(train_ds))))
    x = torch.stack(list(xs)).flatten(1).numpy()
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
    clf.fit(x, np.asarray(ys))
    correct = 0
    for x, y, valid in data.eval_loader(test_ds, batch, rt.rank, rt.world_size, workers):
        pred = torch.from_numpy(clf.predict(x.flatten(1).numpy()))
        correct += int(((pred == y) & valid).sum())
    total = torch.tensor(float(correct), device=rt.device)
    return rt.all_reduce(total, op="sum") * (100.0 / len(test_ds))


# ----------------------------------------------------------------------------- labelled subsets

def train_labels(ds) -> torch.Tensor:
    """Labels of a map-style train set without decoding images where the dataset keeps them."""
    if isinstance(ds, data.ShardSet):
        raise UserError("the few-label study needs random access to the train images; shards stream. "
                        "Use a local data.root in the dataset's own format")
    base = getattr(ds, "base", ds)
    for attr in ("targets", "labels"):
        if hasattr(base, attr):
            return torch.as_tensor(np.asarray(getattr(base, attr)), dtype=torch.long)
    if hasattr(base, "samples"):
        return torch.tensor([s[1] for s in base.samples], dtype=torch.long)
    return torch.tensor([base[i][1] for i in range(len(base))], dtype=torch.long)


def balanced_subset(labels: torch.Tensor, n: int, classes: int, seed: int) -> torch.Tensor:
    """``n`` indices, n // classes per class (the remainder to randomly chosen classes), seeded."""
    if n < classes:
        raise UserError(f"--labels {n} is fewer than the {classes} classes; use at least {classes}")
    g = torch.Generator().manual_seed(seed)
    per_class = [n // classes] * classes
    for c in torch.randperm(classes, generator=g)[: n % classes].tolist():
        per_class[c] += 1
    picked = []
    for c, k in enumerate(per_class):
        pool = (labels == c).nonzero().flatten()
        if len(pool) < k:
            raise UserError(f"--labels {n} needs {k} images of class {c}, the train set has {len(pool)}; "
                            f"use at most {classes * int(torch.bincount(labels, minlength=classes).min())}")
        picked.append(pool[torch.randperm(len(pool), generator=g)[:k]])
    return torch.cat(picked).sort().values


def subset(ds, indices: torch.Tensor) -> Dataset:
    return Subset(ds, indices.tolist())


class Relabelled(Dataset):
    """Images ``indices`` of ``ds`` with ``labels`` (the dataset's own, or a user's labels file)."""

    def __init__(self, ds, indices: torch.Tensor, labels: torch.Tensor) -> None:
        self.ds, self.indices, self.labels = ds, indices.tolist(), labels.tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.ds[self.indices[i]][0], self.labels[i]


def holdout_indices(n: int, exclude: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` seeded indices of range(n) outside ``exclude``: unlabelled images to choose settings on."""
    free = torch.ones(n, dtype=torch.bool)
    free[exclude] = False
    pool = free.nonzero().flatten()
    if count > len(pool):
        raise UserError(f"eval.semisup.holdout={count} exceeds the {len(pool)} unlabelled training images; "
                        f"use at most {len(pool)}")
    g = torch.Generator().manual_seed(seed)
    return pool[torch.randperm(len(pool), generator=g)[:count]].sort().values


LABELS_FILE_FORMAT = ("one labelled image per line, 'index,label' or 'path,label' (an optional header "
                      "line, # comments)")


def read_labels_file(path: str, train_ds, classes: int, root: str | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices into the train set, labels) of a user's labels file; UserError naming the bad line.

    CSV, one image a line: ``index,label`` (index: position in the train split as
    ``data.build`` orders it; for the digits, the fixed stratified split) or ``path,label``
    (an image file of a folder dataset, absolute or relative to data.root); label: the class
    number 0..classes-1. Blank lines and lines starting with # are skipped; a first line
    ``index,label`` or ``path,label`` is a header.
    """
    import csv
    try:
        text = open(path, newline="", encoding="utf-8").read()
    except OSError as e:
        raise UserError(f"--labels-file {path}: cannot read it ({e.strerror or e})") from None
    n = len(train_ds)
    by_path: dict[str, int] | None = None
    seen: dict[int, int] = {}
    indices, labels = [], []
    for line_no, row in enumerate(csv.reader(text.splitlines()), 1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        row = [c.strip() for c in row]
        where = f"--labels-file {path} line {line_no}"
        if len(row) != 2:
            raise UserError(f"{where}: expected 2 fields, got {len(row)}; format: {LABELS_FILE_FORMAT}")
        key, label = row
        if not indices and not seen and label.lower() == "label" and key.lower() in ("index", "path"):
            continue  # header
        if key.lstrip("-").isdigit():
            index = int(key)
            if not 0 <= index < n:
                raise UserError(f"{where}: index {index} is not in the train set (valid: 0..{n - 1})")
        else:
            if by_path is None:
                by_path = _train_paths(train_ds, where)
            index = by_path.get(_resolve(key, root), -1)
            if index < 0:
                raise UserError(f"{where}: {key} is not an image of the train set")
        try:
            y = int(label)
        except ValueError:
            raise UserError(f"{where}: label {label!r} is not a class number (valid: 0..{classes - 1})") from None
        if not 0 <= y < classes:
            raise UserError(f"{where}: label {y} is out of range (valid: 0..{classes - 1})")
        if index in seen:
            raise UserError(f"{where}: image {key} is listed twice (also on line {seen[index]}); "
                            f"one label per image")
        seen[index] = line_no
        indices.append(index)
        labels.append(y)
    if not indices:
        raise UserError(f"--labels-file {path} has no labelled images; format: {LABELS_FILE_FORMAT}")
    counts = torch.bincount(torch.tensor(labels), minlength=classes)
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise UserError(f"--labels-file {path} labels no image of class {', '.join(map(str, missing[:10]))}"
                        f"{' ...' if len(missing) > 10 else ''}; every one of the {classes} classes needs one")
    return torch.tensor(indices), torch.tensor(labels)


def _resolve(p: str, root: str | None) -> str:
    q = Path(p)
    if not q.is_absolute() and root:
        q = Path(root) / q
    return str(q.resolve())


def _train_paths(train_ds, where: str) -> dict[str, int]:
    base = getattr(train_ds, "base", train_ds)
    if not hasattr(base, "samples"):
        raise UserError(f"{where}: this dataset's images have no file paths; use 'index,label' rows")
    return {str(Path(s[0]).resolve()): i for i, s in enumerate(base.samples)}
