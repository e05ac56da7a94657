"""Views of a train split: a balanced slice of it (data.subset), who is labelled, how the images are seen.

A balanced seeded slice of a large train set (``data.subset``, for pre-training and the study
alike), a seeded class-balanced draw of N labelled images, a user's labels file (``index,label`` or
``path,label`` rows), held-out unlabelled images to choose settings on, images relabelled with
chosen labels, and the same images under another transform (supervised crops, Noisy Student's
clean-and-augmented pairs). All take a ``data.build()`` dataset and return map-style datasets.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2

from ..errors import UserError
from .images import BadImage
from .shardset import ShardSet
from .transforms import CleanAndAugmented, eval_transform


# ----------------------------------------------------------------------------- other transforms

def with_transform(ds, transform: Callable):
    """The same images as a DataBundle's ``bank`` (train split) under another transform."""
    if isinstance(ds, ShardSet):
        return dataclasses.replace(ds, transform=transform)
    if not hasattr(ds, "base"):
        raise UserError(f"cannot re-transform a {type(ds).__name__}; expected a data.build() dataset")
    return type(ds)(ds.base, transform, ds.num_classes, ds.skips)


def stored_size(ds) -> int | None:
    """The short side of ``ds``'s first image as stored (before its transform), or None for shards
    and for a first image that cannot be read (the caller then keeps the transform's size)."""
    if isinstance(ds, ShardSet):
        return None
    try:
        img, _ = ds.base[0]
    except (BadImage, OSError):
        return None
    return min(v2.functional.get_size(img))


def at_stored_size(ds, preset: str, size: int, channels: int):
    """``ds`` (a data.build() dataset, eval transform at ``size``) at its images' stored size where
    ``size`` would upsample them (the digits' 8x8 at image_size 16), else ``ds`` itself. Upsampling
    adds no information, and its interpolation blurs the pixels: a raw-pixel baseline reads the
    images as stored, never a blurred copy."""
    stored = stored_size(ds)
    if stored is None or stored >= size:
        return ds
    return with_transform(ds, eval_transform(preset, stored, channels))


def clean_and_augmented(ds, augment: Callable):
    """``ds`` (a data.build() dataset, eval transform) yielding ((clean image, ``augment``ed image), label)
    from one read of each sample: the teacher's and the student's views for Noisy Student."""
    return with_transform(ds, CleanAndAugmented(ds.transform, augment))


# ----------------------------------------------------------------------------- labelled subsets

def train_labels(ds) -> torch.Tensor:
    """Labels of a map-style train set without decoding images where the dataset keeps them."""
    if isinstance(ds, ShardSet):
        raise UserError("the few-label study needs random access to the train images; shards stream. "
                        "Use a local data.root in the dataset's own format")
    if isinstance(ds, Subset):  # e.g. what data.val_size leaves for training
        return train_labels(ds.dataset)[torch.as_tensor(ds.indices, dtype=torch.long)]
    base = getattr(ds, "base", ds)
    for attr in ("targets", "labels"):
        if hasattr(base, attr):
            return torch.as_tensor(np.asarray(getattr(base, attr)), dtype=torch.long)
    if hasattr(base, "samples"):
        return torch.tensor([s[1] for s in base.samples], dtype=torch.long)
    return torch.tensor([base[i][1] for i in range(len(base))], dtype=torch.long)


def balanced_subset(labels: torch.Tensor, n: int, classes: int, seed: int, name: str = "--labels") -> torch.Tensor:
    """``n`` indices, n // classes per class (the remainder to randomly chosen classes), seeded; errors name
    the setting ``name``."""
    if n < classes:
        raise UserError(f"{name} {n} is fewer than the {classes} classes; use at least {classes}")
    g = torch.Generator().manual_seed(seed)
    per_class = [n // classes] * classes
    for c in torch.randperm(classes, generator=g)[: n % classes].tolist():
        per_class[c] += 1
    picked = []
    for c, k in enumerate(per_class):
        pool = (labels == c).nonzero().flatten()
        if len(pool) < k:
            raise UserError(f"{name} {n} needs {k} images of class {c}, the train set has {len(pool)}; "
                            f"use at most {classes * int(torch.bincount(labels, minlength=classes).min())}")
        picked.append(pool[torch.randperm(len(pool), generator=g)[:k]])
    return torch.cat(picked).sort().values


# ----------------------------------------------------------------------------- data.subset

SUBSET_FORMAT = "null (every training image), a total such as 1000, or a count per class such as 100/class"


def parse_subset(text: str | None) -> tuple[int, bool]:
    """data.subset as (count, per_class): null -> (0, False), '1000' -> (1000, False), '100/class' -> (100, True)."""
    text = str(text or "").strip()
    if not text:
        return 0, False
    count, per_class = (text[: -len("/class")], True) if text.endswith("/class") else (text, False)
    if not count.strip().isdigit() or int(count) < 1:
        raise UserError(f"config key 'data.subset' is {text!r}; valid: {SUBSET_FORMAT}")
    return int(count), per_class


def check_subset(data_cfg, sharded: bool) -> None:
    """data.subset's format, before replicas start; a slice needs random access (no streamed shards)."""
    count, _ = parse_subset(data_cfg.subset)
    if count and sharded:
        raise UserError(f"data.subset={data_cfg.subset} needs a data.root in the dataset's own format; "
                        f"shards stream (write shards of the slice instead)")


def slice_train(train: Dataset, data_cfg, classes: int) -> Dataset:
    """The raw train set, or its balanced seeded slice (data.subset, data.subset_seed): the same images for
    the same seed in pre-training and in the evaluation; labels-file indices count within the slice."""
    count, per_class = parse_subset(data_cfg.subset)
    if not count:
        return train
    n = count * classes if per_class else count
    picked = balanced_subset(train_labels(train), n, classes, data_cfg.subset_seed,
                             f"data.subset={data_cfg.subset}: a balanced slice of")
    return TrainSlice(train, picked)


class TrainSlice(Dataset):
    """Images ``indices`` of a raw train set, keeping what the pipeline reads of one: labels (``targets``),
    encoded bytes and file paths where the set has them, and where a bad sample came from."""

    def __init__(self, source: Dataset, indices: torch.Tensor) -> None:
        self.source, self.indices = source, indices.tolist()
        self.targets = train_labels(source)[indices].tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.source[self.indices[i]]

    @property
    def encoded(self) -> Callable:
        read = self.source.encoded  # AttributeError where the set keeps no encoded bytes
        return lambda i: read(self.indices[i])

    @property
    def samples(self) -> list:
        return [self.source.samples[j] for j in self.indices]  # AttributeError where there are no paths

    def describe(self, i: int) -> str:
        describe = getattr(self.source, "describe", None)
        j = self.indices[i]
        return describe(j) if describe else f"#{j} of {type(self.source).__name__} (data.subset #{i})"


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
    find = _ImageFinder(train_ds, root)
    seen: dict[int, int] = {}  # train index -> line number, in the file's order
    labels = []
    for line_no, key, label in _label_rows(path):
        where = f"--labels-file {path} line {line_no}"
        index = find(key, where)
        y = _class_number(label, classes, where)
        if index in seen:
            raise UserError(f"{where}: image {key} is listed twice (also on line {seen[index]}); "
                            f"one label per image")
        seen[index] = line_no
        labels.append(y)
    if not labels:
        raise UserError(f"--labels-file {path} has no labelled images; format: {LABELS_FILE_FORMAT}")
    _check_every_class(path, labels, classes)
    return torch.tensor(list(seen)), torch.tensor(labels)


def _label_rows(path: str) -> Iterator[tuple[int, str, str]]:
    """(line number, image key, label) of every data line: comments, blank lines and a header skipped."""
    import csv
    try:
        text = open(path, newline="", encoding="utf-8").read()
    except OSError as e:
        raise UserError(f"--labels-file {path}: cannot read it ({e.strerror or e})") from None
    first = True
    for line_no, row in enumerate(csv.reader(text.splitlines()), 1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        row = [c.strip() for c in row]
        if len(row) != 2:
            raise UserError(f"--labels-file {path} line {line_no}: expected 2 fields, got {len(row)}; "
                            f"format: {LABELS_FILE_FORMAT}")
        key, label = row
        header = first and label.lower() == "label" and key.lower() in ("index", "path")
        first = False
        if not header:
            yield line_no, key, label


class _ImageFinder:
    """A labels file's image key (an index, or a path of a folder dataset) as an index into the train set."""

    def __init__(self, train_ds, root: str | None) -> None:
        self.train_ds, self.root, self.n = train_ds, root, len(train_ds)
        self.by_path: dict[str, int] | None = None

    def __call__(self, key: str, where: str) -> int:
        if key.lstrip("-").isdigit():
            index = int(key)
            if not 0 <= index < self.n:
                raise UserError(f"{where}: index {index} is not in the train set (valid: 0..{self.n - 1})")
            return index
        if self.by_path is None:
            self.by_path = _train_paths(self.train_ds, where)
        index = self.by_path.get(_resolve(key, self.root), -1)
        if index < 0:
            raise UserError(f"{where}: {key} is not an image of the train set")
        return index


def _class_number(label: str, classes: int, where: str) -> int:
    try:
        y = int(label)
    except ValueError:
        raise UserError(f"{where}: label {label!r} is not a class number (valid: 0..{classes - 1})") from None
    if not 0 <= y < classes:
        raise UserError(f"{where}: label {y} is out of range (valid: 0..{classes - 1})")
    return y


def _check_every_class(path: str, labels: list[int], classes: int) -> None:
    counts = torch.bincount(torch.tensor(labels), minlength=classes)
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise UserError(f"--labels-file {path} labels no image of class {', '.join(map(str, missing[:10]))}"
                        f"{' ...' if len(missing) > 10 else ''}; every one of the {classes} classes needs one")


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
