"""Writers for tiny datasets in the real on-disk formats (no downloads), for tests and smoke runs.

Each writer produces exactly the files a user has after downloading the real
dataset, so tests read them through the same code a user runs:

- ``write_mnist(root, n)``: ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``
- ``write_emnist(root, split, n)``: ``<root>/EMNIST/raw/emnist-<split>-{train,test}-...-ubyte[.gz]``,
  images stored transposed as in the real EMNIST files
- ``write_cifar10(root, n)``: ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``
- ``write_image_folder(root, classes, per_class, size, fmt)``: ``<root>/<class>/<i>.<fmt>``
- ``write_imagenet(root, classes, per_class, size)``: ``<root>/train/<wnid>/`` and ``<root>/val/<wnid>/``

Images are learnable on purpose: each class has its own pattern (a bar whose
position encodes the label, or a colour) plus noise, so kNN beats chance.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

EMNIST_CLASSES = {"byclass": 62, "bymerge": 47, "balanced": 47, "letters": 26, "digits": 10, "mnist": 10}


def class_pattern(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A uint8 [size, size] image: a bright horizontal bar at a row set by ``label``, plus noise.

    Rows differ per class and the bar sits in the upper or lower half, so an image
    shown upside down or transposed is recognisably wrong (orientation tests use this).
    """
    img = rng.integers(0, 40, (size, size), dtype=np.uint8)
    row = 1 + (label * 3) % max(size - 3, 1)
    img[row:row + 2, 1:size - 1] = 255
    img[:, :2] = 200  # a left edge: transposing moves it to the top
    return img


def _labels(n: int, classes: int, rng: np.random.Generator, offset: int = 0) -> np.ndarray:
    """Balanced labels in a random order (every class appears when n >= classes)."""
    return (rng.permutation(np.arange(n) % classes) + offset).astype(np.uint8)


def _idx_bytes(arr: np.ndarray) -> bytes:
    """IDX (``ubyte``) encoding: magic 0x0000080<ndim>, big-endian dims, raw uint8 data."""
    header = struct.pack(">I", 0x0800 | arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)


def _digit_images(labels: np.ndarray, rng: np.random.Generator, size: int = 28) -> np.ndarray:
    return np.stack([class_pattern(int(y), size, rng) for y in labels]) if len(labels) else \
        np.zeros((0, size, size), np.uint8)


def write_mnist(root: str | Path, n: int = 200, test_n: int | None = None, gz: bool = False,
                seed: int = 0) -> Path:
    """MNIST IDX files (28x28, 10 classes) under ``<root>/MNIST/raw``; ``gz`` writes ``.gz`` only."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / "MNIST" / "raw"
    for prefix, count in (("train", n), ("t10k", test_n if test_n is not None else max(n // 4, 10))):
        labels = _labels(count, 10, rng)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", _digit_images(labels, rng), gz)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, gz)
    return Path(root)


def write_emnist(root: str | Path, split: str = "balanced", n: int = 200, test_n: int | None = None,
                 gz: bool = False, seed: int = 0) -> Path:
    """EMNIST IDX files for ``split`` under ``<root>/EMNIST/raw``, images transposed like the real files.

    ``letters`` labels are 1..26 as in the real split (0 is unused there).
    """
    if split not in EMNIST_CLASSES:
        raise ValueError(f"unknown EMNIST split {split!r}; valid: {', '.join(EMNIST_CLASSES)}")
    rng = np.random.default_rng(seed)
    raw = Path(root) / "EMNIST" / "raw"
    classes, offset = EMNIST_CLASSES[split], 1 if split == "letters" else 0
    for part, count in (("train", n), ("test", test_n if test_n is not None else max(n // 4, 10))):
        labels = _labels(count, classes, rng, offset)
        images = _digit_images(labels - offset, rng).transpose(0, 2, 1)  # stored column-major
        _write_idx(raw / f"emnist-{split}-{part}-images-idx3-ubyte", images, gz)
        _write_idx(raw / f"emnist-{split}-{part}-labels-idx1-ubyte", labels, gz)
    return Path(root)


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def color_image(label: int, classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A uint8 [size, size, 3] image: a class colour plus the class bar pattern and noise."""
    hue = np.array([(label * 97) % 256, (label * 53 + 80) % 256, (label * 181 + 160) % 256], np.uint8)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = hue
    bar = class_pattern(label % max(classes, 1), size, rng)
    return np.clip(img.astype(np.int16) // 2 + bar[..., None] // 2, 0, 255).astype(np.uint8)


def write_cifar10(root: str | Path, n: int = 200, test_n: int | None = None, seed: int = 0) -> Path:
    """CIFAR-10 python pickles (protocol 2, as distributed) under ``<root>/cifar-10-batches-py``.

    The ``n`` training images are spread over data_batch_1..5 like the real set.
    """
    rng = np.random.default_rng(seed)
    base = Path(root) / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)

    def batch(labels: np.ndarray, name: str) -> dict:
        imgs = np.stack([color_image(int(y), 10, 32, rng) for y in labels]) if len(labels) else \
            np.zeros((0, 32, 32, 3), np.uint8)
        return {"batch_label": name, "labels": [int(y) for y in labels],
                "data": imgs.transpose(0, 3, 1, 2).reshape(len(labels), 3072),
                "filenames": [f"{name.replace(' ', '_')}_{i}.png" for i in range(len(labels))]}

    train_labels = _labels(n, 10, rng)
    for i, part in enumerate(np.array_split(train_labels, 5), start=1):
        _pickle(base / f"data_batch_{i}", batch(part, f"training batch {i} of 5"))
    test_count = test_n if test_n is not None else max(n // 4, 10)
    _pickle(base / "test_batch", batch(_labels(test_count, 10, rng), "testing batch 1 of 1"))
    _pickle(base / "batches.meta", {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": 10000,
                                    "num_vis": 3072})
    return Path(root)


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_image_folder(root: str | Path, classes: int | list[str] = 3, per_class: int = 8, size: int = 32,
                       fmt: str = "jpg", seed: int = 0, mode: str = "RGB") -> Path:
    """Class-per-directory images ``<root>/<class>/<i>.<fmt>`` (fmt: jpg, jpeg or png; mode RGB or L)."""
    names = [f"class_{i:02d}" for i in range(classes)] if isinstance(classes, int) else list(classes)
    rng = np.random.default_rng(seed)
    pil_format = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG"}[fmt.lower()]
    for label, name in enumerate(names):
        d = Path(root) / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = color_image(label, len(names), size, rng)
            img = Image.fromarray(arr, "RGB")
            if mode == "L":
                img = img.convert("L")
            img.save(d / f"{name}_{i:04d}.{fmt}", format=pil_format, **({"quality": 95} if pil_format ==
                                                                          "JPEG" else {}))
    return Path(root)


def write_imagenet(root: str | Path, classes: int = 4, per_class: int = 8, val_per_class: int = 2,
                   size: int = 40, fmt: str = "jpg", seed: int = 0) -> Path:
    """ImageFolder layout ``<root>/train/<wnid>/`` and ``<root>/val/<wnid>/`` with WordNet-style ids."""
    wnids = [f"n{1440764 + 1000 * i:08d}" for i in range(classes)]
    write_image_folder(Path(root) / "train", wnids, per_class, size, fmt, seed)
    write_image_folder(Path(root) / "val", wnids, val_per_class, size, fmt, seed + 1)
    return Path(root)
