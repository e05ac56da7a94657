"""``python -m moco_xla.shards``: pack a dataset into WebDataset tar shards for streaming from GCS.

    python -m moco_xla.shards --dataset imagenet --root /data/imagenet --out gs://my-bucket/imagenet
    python -m moco_xla.shards --dataset cifar10 --root ~/data --out /data/cifar10-shards --shard-size 5000
    python -m moco_xla.shards --dataset digits --out /tmp/digits-shards

Writes ``<out>/train/`` and ``<out>/test/`` (ImageNet val), each with shard-NNNNNN.tar
files (``<key>.jpg`` or ``<key>.png`` + ``<key>.cls``) and a manifest.json listing the
samples per shard. Samples are shuffled with a fixed seed before packing, so a
sequential read of any shard range is already class-mixed. JPEG and PNG files are
copied byte for byte; decoded datasets (MNIST, CIFAR-10) are stored as lossless PNG.
Keys are the sample's index in the source split. Then train with
``--set data.root=<out>``.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import cli
from .config import DataConfig
from .data import storage
from .data.datasets import REGISTRY, FileImages, RawData, build_raw, spec
from .data.images import BadImage, decode_bytes, encode_png, sniff_format
from .data.shardset import MANIFEST, Manifest, SPLITS, is_shard_root, split_url
from .errors import UserError

# Fixed member times: packing the same data twice gives identical shards. An int: with a float,
# tarfile writes a PAX header before every member, and reading the shards parses twice the headers.
TAR_MTIME = 0


class Encoded(Dataset):
    """(key, image bytes, extension, label) of ``base`` in ``order``; runs in DataLoader workers."""

    def __init__(self, base: Dataset, order: list[int]) -> None:
        self.base, self.order = base, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> tuple[str, bytes, str, int]:
        j = self.order[i]
        if isinstance(self.base, FileImages):
            path, label = self.base.samples[j]
            data, ext = _file_bytes(path)
        else:
            img, label = self.base[j]
            data, ext = encode_png(_as_tensor(img)), "png"
        return f"{j:08d}", data, ext, int(label)


def _file_bytes(path: str) -> tuple[bytes, str]:
    """JPEG/PNG bytes as they are; other formats (BMP, TIFF, ...) re-encoded as PNG."""
    with open(path, "rb") as f:
        data = f.read()
    ext = sniff_format(data)
    if ext is not None:
        return data, ext
    try:
        return encode_png(decode_bytes(data)), "png"
    except BadImage as e:
        raise UserError(f"cannot decode image {path}: {e}") from None


def _as_tensor(img) -> torch.Tensor:
    if isinstance(img, torch.Tensor):
        return img
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1) if np.asarray(img).ndim == 3 else \
        torch.from_numpy(np.asarray(img).copy())


def encoded_samples(ds: Dataset, seed: int | None, workers: int) -> Iterator[tuple[str, bytes, str, int]]:
    """The split's samples in a seeded random order (``seed`` None: source order)."""
    order = list(range(len(ds)))
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(ds)).tolist()
    loader = DataLoader(Encoded(ds, order), batch_size=None, num_workers=workers, prefetch_factor=64
                        if workers else None)
    yield from loader


def write_split(ds: Dataset, out: str, split: str, meta: dict, shard_size: int, seed: int | None,
                workers: int = 0, progress: bool = True) -> Manifest:
    """Pack one split into ``<out>/<split>/shard-*.tar`` + manifest.json; returns the manifest."""
    from tqdm import tqdm
    from webdataset import TarWriter
    url = split_url(out, split)
    fs, path = storage.filesystem(url)
    if not storage.is_remote(url):
        fs.makedirs(path, exist_ok=True)
    shards: list[dict] = []
    formats: set[str] = set()
    writer, f = None, None
    bar = tqdm(total=len(ds), desc=f"{split}", unit="img", disable=not progress, dynamic_ncols=True)
    for key, data, ext, label in encoded_samples(ds, seed, workers):
        if writer is None or shards[-1]["count"] == shard_size:
            if writer is not None:
                writer.close()
                f.close()
            shards.append({"name": f"shard-{len(shards):06d}.tar", "count": 0})
            f = fs.open(f"{path}/{shards[-1]['name']}", "wb")
            writer = TarWriter(f, encoder=False, mtime=TAR_MTIME)
        writer.write({"__key__": key, ext: data, "cls": str(label).encode()})
        shards[-1]["count"] += 1
        formats.add(ext)
        bar.update(1)
    if writer is not None:
        writer.close()
        f.close()
    bar.close()
    if not shards:
        raise UserError(f"the {split} split of {meta['dataset']} is empty: nothing to write")
    m = Manifest(url, meta["dataset"], split, meta["classes"], meta["channels"],
                 formats.pop() if len(formats) == 1 else "mixed", shards, meta.get("subset"),
                 {"seed": seed, "shard_size": shard_size, "source": meta.get("source")})
    storage.write_bytes(storage.join(url, MANIFEST), m.to_json().encode())  # last: marks the split complete
    return m


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser("python -m moco_xla.shards", __doc__)
    p.add_argument("--dataset", required=True, help=f"one of: {', '.join(REGISTRY)}")
    p.add_argument("--root", default=None, help="the dataset's local directory (as for training)")
    p.add_argument("--out", required=True, help="output directory or gs://bucket/prefix")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--split", default="both", choices=("train", "test", "both"),
                   help="which split to write (test = ImageNet val; default both)")
    p.add_argument("--emnist-split", default="balanced", help="EMNIST split (data.split), default balanced")
    p.add_argument("--test-fraction", type=float, default=0.3,
                   help="held-out fraction for digits and single-folder datasets (data.test_fraction)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the source order (not recommended)")
    p.add_argument("--workers", type=int, default=0, help="processes reading and encoding images")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> list[Manifest]:
    if args.shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    s = spec(args.dataset)
    d = DataConfig(dataset=args.dataset, root=args.root, split=args.emnist_split,
                   test_fraction=args.test_fraction)
    if args.root and is_shard_root(args.root):
        raise UserError(f"--root {args.root} already holds shards; point --root at the original dataset")
    if s.name != "digits":
        if not args.root:
            raise UserError(f"--dataset {args.dataset} needs --root: a local directory ({s.layout})")
        s.check(d)
    if storage.is_remote(args.out):
        storage.check_bucket(args.out, "--out")
    raw: RawData = build_raw(d)
    meta = {"dataset": s.name, "classes": raw.classes, "channels": s.channels, "source": args.root,
            "subset": args.emnist_split if s.name == "emnist" else None}
    splits = SPLITS if args.split == "both" else (args.split,)
    seed = None if args.no_shuffle else args.seed
    out = []
    for split in splits:
        ds = raw.train if split == "train" else raw.test
        m = write_split(ds, args.out, split, meta, args.shard_size, seed, args.workers, not args.quiet)
        print(f"{split}: {m.total} samples in {len(m.shards)} shards -> {m.url} ({m.image_format})", flush=True)
        out.append(m)
    print(f"train with: --set data.dataset={s.name} --set data.root={args.out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = cli.argv_or_sys(argv)

    def write_shards() -> int:
        run(parse_args(argv))
        return 0

    return cli.run(write_shards, argv)


if __name__ == "__main__":
    sys.exit(main())
