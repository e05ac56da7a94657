"""Datasets by name (``REGISTRY``), read from a local root with torchvision's dataset classes.

Every builder returns ``RawData(train, test, classes)``: map-style datasets of
(uint8 image tensor [C, H, W], label); the transforms are attached by
``data.build``. A gs:// root, or a local root holding ``train/manifest.json``,
is a shard set (see ``shardset.py``) and never reaches these builders.

Formats are the ones users download, read offline (download=False):
- mnist: IDX files (raw or .gz) in <root>/MNIST/raw, <root>/raw or <root>
- emnist: emnist-<split>-{train,test}-*-ubyte[.gz] in <root>/EMNIST/raw, <root>/gzip, ...;
  the files store images transposed, fixed here; ``letters`` labels 1..26 become 0..25
- cifar10: python pickle batches in <root>/cifar-10-batches-py (or <root> itself)
- imagenet, imagenet-mini: ImageFolder layout <root>/train/<class>/*, <root>/val/<class>/*
- folder: the same, or one class-per-directory folder split by data.test_fraction
"""
from __future__ import annotations

import gzip
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset

from ..errors import UserError
from .images import decode_file


@dataclass
class RawData:
    train: Dataset
    test: Dataset
    classes: list[str]


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: ``check`` is cheap (layout only) and runs before replicas start."""

    name: str
    build: Callable[..., RawData]
    check: Callable[..., None]
    layout: str          # the expected root layout, for error messages
    channels: int        # channels of the stored images (1 gray, 3 RGB)


class TensorImages(Dataset):
    """uint8 images [N, C, H, W] and integer labels in memory, with an optional transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None,
                 classes: list[str] | None = None):
        self.images, self.labels, self.transform = images, labels, transform
        self.classes = classes or [str(c) for c in range(int(labels.max()) + 1 if len(labels) else 0)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i]
        return (self.transform(img) if self.transform else img), int(self.labels[i])


def load_digits(test_fraction: float = 0.3, seed: int = 0):
    """The 1,797 handwritten 8x8 digits bundled with scikit-learn, with a fixed stratified split.

    Works offline: the data ship inside scikit-learn. Pixel values 0..16 become uint8 0..255.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    d = sk_load_digits()
    images = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                           stratify=d.target, random_state=seed)
    return (TensorImages(images[idx_train], labels[idx_train]),
            TensorImages(images[idx_test], labels[idx_test]), 10)


def _digits(d) -> RawData:
    train, test, _ = load_digits(d.test_fraction)
    return RawData(train, test, [str(i) for i in range(10)])


# ---------------------------------------------------------------- IDX (MNIST, EMNIST)

def read_idx(path: Path) -> torch.Tensor:
    """An IDX ``ubyte`` file (optionally .gz) as a uint8 tensor; UserError if it is not one."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise UserError(f"{path} is not a readable gzip file ({e})") from None
    if len(data) < 4 or data[0] or data[1] or data[2] != 0x08 or not 1 <= data[3] <= 3:
        raise UserError(f"{path} is not an IDX ubyte file (bad magic number)")
    nd = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(nd)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * nd)
    if body.size != int(np.prod(dims)):
        raise UserError(f"{path} is truncated: header says {dims}, found {body.size} bytes of data")
    return torch.from_numpy(body.reshape(dims).copy())


def find_idx_dir(root: str, subdir: str, names: list[str], what: str) -> Path:
    """The first of <root>/<subdir>/raw, <root>/gzip, <root>/raw, <root> holding ``names`` (raw or .gz)."""
    base = local_root(root, what)
    for d in (base / subdir / "raw", base / "gzip", base / "raw", base):
        if all((d / n).is_file() or (d / f"{n}.gz").is_file() for n in names):
            return d
    raise UserError(f"data.root {root} has no {what} files: expected {', '.join(names)} (or .gz) "
                    f"in {base / subdir / 'raw'} or {base}")


def _idx_path(d: Path, name: str) -> Path:
    return d / name if (d / name).is_file() else d / f"{name}.gz"


class IdxMNIST(torchvision.datasets.MNIST):
    """torchvision's MNIST reading IDX files, raw or gzipped, from an explicit folder."""

    def __init__(self, raw_dir: Path, train: bool) -> None:
        self._raw = Path(raw_dir)
        super().__init__(str(raw_dir), train=train, download=False)

    @property
    def raw_folder(self) -> str:
        return str(self._raw)

    def _files(self) -> tuple[str, str]:
        prefix = "train" if self.train else "t10k"
        return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"

    def _check_exists(self) -> bool:
        return all(_idx_path(self._raw, f).is_file() for f in self._files())

    def _load_data(self):
        images, labels = (read_idx(_idx_path(self._raw, f)) for f in self._files())
        return _checked_pair(images, labels, self._raw)

    def __getitem__(self, i: int):
        return self.data[i].unsqueeze(0), int(self.targets[i])  # no PIL round trip


class IdxEMNIST(torchvision.datasets.EMNIST):
    """torchvision's EMNIST with the stored transposition undone and letters labels made 0-based."""

    def __init__(self, raw_dir: Path, split: str, train: bool) -> None:
        self._raw = Path(raw_dir)
        super().__init__(str(raw_dir), split=split, train=train, download=False)
        if split == "letters":
            self.classes = list(string.ascii_lowercase)

    @property
    def raw_folder(self) -> str:
        return str(self._raw)

    @property
    def images_file(self) -> str:
        return str(_idx_path(self._raw, f"{self._file_prefix}-images-idx3-ubyte"))

    @property
    def labels_file(self) -> str:
        return str(_idx_path(self._raw, f"{self._file_prefix}-labels-idx1-ubyte"))

    def _check_exists(self) -> bool:
        return Path(self.images_file).is_file() and Path(self.labels_file).is_file()

    def _load_data(self):
        images, labels = read_idx(Path(self.images_file)), read_idx(Path(self.labels_file))
        images, labels = _checked_pair(images, labels, self._raw)
        if self.split == "letters":
            labels = labels - 1
        return images.transpose(1, 2).contiguous(), labels.long()

    def __getitem__(self, i: int):
        return self.data[i].unsqueeze(0), int(self.targets[i])


def _checked_pair(images: torch.Tensor, labels: torch.Tensor, where: Path):
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise UserError(f"IDX files in {where} disagree: images {tuple(images.shape)}, labels "
                        f"{tuple(labels.shape)} (expected [N, H, W] and [N])")
    return images, labels


MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
EMNIST_SPLITS = ("balanced", "byclass", "bymerge", "letters", "digits", "mnist")


def emnist_files(split: str) -> list[str]:
    return [f"emnist-{split}-{p}-{k}-ubyte" for p in ("train", "test") for k in ("images-idx3", "labels-idx1")]


def _check_mnist(d) -> None:
    find_idx_dir(d.root, "MNIST", MNIST_FILES, "MNIST")


def _mnist(d) -> RawData:
    raw = find_idx_dir(d.root, "MNIST", MNIST_FILES, "MNIST")
    train = IdxMNIST(raw, train=True)
    return RawData(train, IdxMNIST(raw, train=False), [str(c) for c in range(10)])


def _check_emnist_split(d) -> None:
    if d.split not in EMNIST_SPLITS:
        raise UserError(f"data.split={d.split!r} is not an EMNIST split; valid: {', '.join(EMNIST_SPLITS)}")


def _check_emnist(d) -> None:
    _check_emnist_split(d)
    find_idx_dir(d.root, "EMNIST", emnist_files(d.split), f"EMNIST {d.split}")


def _emnist(d) -> RawData:
    _check_emnist_split(d)
    raw = find_idx_dir(d.root, "EMNIST", emnist_files(d.split), f"EMNIST {d.split}")
    train = IdxEMNIST(raw, d.split, train=True)
    return RawData(train, IdxEMNIST(raw, d.split, train=False), list(train.classes))


# ---------------------------------------------------------------- CIFAR-10

CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


class LocalCIFAR10(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR10 parser; files must exist but need not match the full set's MD5s.

    (A subset or a re-packed copy is still a valid CIFAR-10 layout.)
    """

    def _check_integrity(self) -> bool:
        return all((Path(self.root) / self.base_folder / f).is_file() for f in CIFAR_FILES)

    def _load_meta(self) -> None:
        import pickle
        with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def __getitem__(self, i: int):
        return torch.from_numpy(self.data[i]).permute(2, 0, 1), int(self.targets[i])


def _cifar_root(root: str) -> Path:
    base = local_root(root, "CIFAR-10")
    for parent in (base, base.parent):
        if all((parent / "cifar-10-batches-py" / f).is_file() for f in CIFAR_FILES):
            return parent
    raise UserError(f"data.root {root} has no CIFAR-10 python batches: expected "
                    f"{base / 'cifar-10-batches-py'}/{{{','.join(CIFAR_FILES)}}}")


def _check_cifar10(d) -> None:
    _cifar_root(d.root)


def _cifar10(d) -> RawData:
    root = _cifar_root(d.root)
    try:
        train = LocalCIFAR10(str(root), train=True, download=False)
        test = LocalCIFAR10(str(root), train=False, download=False)
    except Exception as e:  # unpickling or reshape errors: a damaged batch file
        raise UserError(f"cannot read CIFAR-10 batches in {root / 'cifar-10-batches-py'}: "
                        f"{type(e).__name__}: {e}") from None
    return RawData(train, test, list(train.classes))


# ---------------------------------------------------------------- image folders

class FileImages(Dataset):
    """Images listed as (path, label) pairs, decoded on access (ImageFolder without PIL)."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str]) -> None:
        self.samples, self.classes = samples, classes
        self.targets = [y for _, y in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return decode_file(path), label

    def encoded(self, i: int) -> tuple[bytes, int]:
        """(the file's bytes, label): for transforms that decode themselves (transforms.CropViews)."""
        path, label = self.samples[i]
        with open(path, "rb") as f:
            return f.read(), label

    def describe(self, i: int) -> str:
        return self.samples[i][0]


def scan_folder(root: Path, class_to_idx: dict[str, int] | None = None) -> FileImages:
    """Class-per-directory images; ``class_to_idx`` from the train folder keeps val labels aligned."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    try:
        classes, found = find_classes(str(root))
    except FileNotFoundError:
        raise UserError(f"{root} has no class folders (expected {root}/<class>/<image>)") from None
    if class_to_idx is None:
        class_to_idx = found
    else:
        extra = sorted(set(classes) - set(class_to_idx))
        if extra:
            raise UserError(f"{root} has classes not in the train folder: {', '.join(extra[:5])}"
                            f"{' ...' if len(extra) > 5 else ''}")
    try:
        samples = make_dataset(str(root), class_to_idx, IMG_EXTENSIONS, allow_empty=True)
    except FileNotFoundError as e:
        raise UserError(f"{root}: {e}") from None
    if not samples:
        raise UserError(f"{root} has no images ({', '.join(IMG_EXTENSIONS)}) in its class folders")
    names = sorted(class_to_idx, key=class_to_idx.get)
    return FileImages(samples, names)


def stratified_split(ds: FileImages, test_fraction: float, seed: int = 0) -> tuple[FileImages, FileImages]:
    """A fixed seeded per-class split (every class with 2+ images appears on both sides)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    by_class: dict[int, list[tuple[str, int]]] = {}
    for s in ds.samples:
        by_class.setdefault(s[1], []).append(s)
    for label in sorted(by_class):
        items = by_class[label]
        order = rng.permutation(len(items))
        k = min(len(items) - 1, max(1, round(len(items) * test_fraction))) if len(items) > 1 else 0
        test += [items[i] for i in sorted(order[:k])]
        train += [items[i] for i in sorted(order[k:])]
    return FileImages(train, ds.classes), FileImages(test, ds.classes)


def _split_dirs(root: str, need_val: bool, what: str) -> tuple[Path, Path | None]:
    base = local_root(root, what)
    train = base / "train"
    val = next((base / v for v in ("val", "test") if (base / v).is_dir()), None)
    if train.is_dir():
        if val is None and need_val:
            raise UserError(f"data.root {root} has train/ but no val/ folder (expected {_FOLDER_LAYOUT})")
        _has_class_dirs(train)
        if val is not None:
            _has_class_dirs(val, flat_hint=True)
        return train, val
    if need_val:
        raise UserError(f"data.root {root} has no train/ folder (expected {_FOLDER_LAYOUT})")
    _has_class_dirs(base)
    return base, None


def _has_class_dirs(d: Path, flat_hint: bool = False) -> None:
    with os.scandir(d) as it:
        entries = list(it)
    if any(e.is_dir() for e in entries):
        return
    if flat_hint and any(e.is_file() for e in entries):
        raise UserError(f"{d} holds images but no class folders; sort them into {d}/<class>/ "
                        f"(for ImageNet val, with the devkit's ground truth)")
    raise UserError(f"{d} is empty: expected class folders {d}/<class>/<image>")


_FOLDER_LAYOUT = "<root>/train/<class>/<image> and <root>/val/<class>/<image>"


def _check_imagenet(d) -> None:
    _split_dirs(d.root, need_val=True, what=d.dataset)


def _imagenet(d) -> RawData:
    train_dir, val_dir = _split_dirs(d.root, need_val=True, what=d.dataset)
    train = scan_folder(train_dir)
    test = scan_folder(val_dir, {c: i for i, c in enumerate(train.classes)})
    return RawData(train, test, train.classes)


def _check_folder(d) -> None:
    _split_dirs(d.root, need_val=False, what="folder")


def _folder(d) -> RawData:
    train_dir, val_dir = _split_dirs(d.root, need_val=False, what="folder")
    whole = scan_folder(train_dir)
    if val_dir is None:
        train, test = stratified_split(whole, d.test_fraction)
    else:
        train, test = whole, scan_folder(val_dir, {c: i for i, c in enumerate(whole.classes)})
    return RawData(train, test, whole.classes)


def local_root(root: str | None, what: str) -> Path:
    """The existing local directory ``root``; UserError naming it otherwise."""
    if not root:
        raise UserError(f"data.root is not set: {what} needs a local directory or a gs://bucket/prefix of shards")
    p = Path(root).expanduser()
    if not p.exists():
        raise UserError(f"data.root {root} does not exist")
    if not p.is_dir():
        raise UserError(f"data.root {root} is not a directory")
    return p


def _no_check(d) -> None:
    return None


REGISTRY: dict[str, DatasetSpec] = {s.name: s for s in [
    DatasetSpec("digits", _digits, _no_check, "built in (scikit-learn)", 1),
    DatasetSpec("mnist", _mnist, _check_mnist, "<root>/MNIST/raw/*-ubyte[.gz]", 1),
    DatasetSpec("emnist", _emnist, _check_emnist, "<root>/EMNIST/raw/emnist-<split>-*-ubyte[.gz]", 1),
    DatasetSpec("cifar10", _cifar10, _check_cifar10, "<root>/cifar-10-batches-py/", 3),
    DatasetSpec("imagenet", _imagenet, _check_imagenet, _FOLDER_LAYOUT, 3),
    DatasetSpec("imagenet-mini", _imagenet, _check_imagenet, _FOLDER_LAYOUT, 3),
    DatasetSpec("folder", _folder, _check_folder, "<root>/<class>/<image> or " + _FOLDER_LAYOUT, 3),
]}


def dataset_names() -> list[str]:
    return list(REGISTRY)


def spec(name: str) -> DatasetSpec:
    s = REGISTRY.get(name)
    if s is None:
        raise UserError(f"unknown dataset {name!r} (data.dataset); valid: {', '.join(dataset_names())}")
    return s


def build_raw(data_cfg) -> RawData:
    """(train, test, classes) for ``data.dataset`` from a local root; UserError on bad names or roots."""
    s = spec(data_cfg.dataset)
    if s.name != "digits":
        s.check(data_cfg)
    return s.build(data_cfg)
