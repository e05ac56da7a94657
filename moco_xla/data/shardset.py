"""Shard sets written by ``python -m moco_xla.shards``: manifest, layout, reading members.

Layout (local directory or gs://bucket/prefix)::

    <root>/train/manifest.json   {"format", "dataset", "split", "subset", "classes", "channels",
                                  "image_format", "total", "shards": [{"name", "count"}, ...]}
    <root>/train/shard-000000.tar  WebDataset layout: <key>.png|.jpg + <key>.cls (class index as text)
    <root>/test/...               the held-out split (ImageNet val), same layout

The per-shard sample counts let every replica compute the epoch's step count
before reading a byte (static shapes on TPU). Members stream through fsspec file
objects into webdataset's tar iterator: nothing is downloaded whole.
"""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..errors import UserError
from . import storage
from .badsamples import SkipCounter

FORMAT = "moco_xla-shards/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "test")
IMAGE_EXTS = ("png", "jpg", "jpeg")


@dataclass
class Manifest:
    url: str                              # the split's directory
    dataset: str
    split: str
    classes: list[str]
    channels: int
    image_format: str                     # png | jpg | mixed
    shards: list[dict]                    # [{"name": "shard-000000.tar", "count": 1000}, ...]
    subset: str | None = None             # EMNIST split
    extra: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(s["count"] for s in self.shards)

    @property
    def counts(self) -> list[int]:
        return [s["count"] for s in self.shards]

    def shard_url(self, i: int) -> str:
        return storage.join(self.url, self.shards[i]["name"])

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "dataset": self.dataset, "split": self.split,
                           "subset": self.subset, "classes": self.classes, "channels": self.channels,
                           "image_format": self.image_format, "total": self.total,
                           "shards": self.shards, **self.extra}, indent=1)


def split_url(root: str, split: str) -> str:
    return storage.join(root, split)


def is_shard_root(root: str | None) -> bool:
    """gs:// roots always hold shards; a local root does when it has train/manifest.json."""
    if not root:
        return False
    return storage.is_remote(root) or storage.exists(storage.join(root, "train", MANIFEST))


def load_manifest(root: str, split: str) -> Manifest:
    """The manifest of ``<root>/<split>``; UserError naming the URL if it is missing or malformed."""
    url = split_url(root, split)
    murl = storage.join(url, MANIFEST)
    try:
        raw = json.loads(storage.read_bytes(murl))
    except FileNotFoundError:
        raise UserError(f"{murl} does not exist: {root} holds no {split} shards; write them with "
                        f"python -m moco_xla.shards --dataset NAME --root SRC --out {root} --split {split}"
                        ) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{murl} is not valid JSON ({e})") from None
    try:
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT!r}")
        shards = [{"name": str(s["name"]), "count": int(s["count"])} for s in raw["shards"]]
        m = Manifest(url, str(raw["dataset"]), str(raw["split"]), [str(c) for c in raw["classes"]],
                     int(raw["channels"]), str(raw["image_format"]), shards, raw.get("subset"))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{murl} is not a moco_xla shard manifest ({type(e).__name__}: {e})") from None
    if m.total == 0:
        raise UserError(f"{murl} lists no samples")
    return m


def check_compatible(m: Manifest, data_cfg) -> None:
    """Shards must be of the configured dataset: a mismatch would train on the wrong data silently."""
    if m.dataset != data_cfg.dataset:
        raise UserError(f"data.root {data_cfg.root} holds shards of {m.dataset!r} but data.dataset is "
                        f"{data_cfg.dataset!r}; set data.dataset={m.dataset}")
    if m.dataset == "emnist" and m.subset != data_cfg.split:
        raise UserError(f"data.root {data_cfg.root} holds EMNIST {m.subset!r} shards but data.split is "
                        f"{data_cfg.split!r}; set data.split={m.subset}")


def check_shard_root(data_cfg) -> tuple[Manifest, Manifest]:
    """Validate a shard root before replicas start: bucket, both manifests, dataset name."""
    root = data_cfg.root
    if storage.is_remote(root):
        storage.check_bucket(root)
    train, test = load_manifest(root, "train"), load_manifest(root, "test")
    check_compatible(train, data_cfg)
    if train.classes != test.classes:
        raise UserError(f"{root}: train and test shards list different classes; re-run moco_xla.shards")
    return train, test


# ---------------------------------------------------------------- reading

@dataclass
class RawSample:
    key: str
    data: bytes
    label: int
    where: str            # "<shard url>:<key>.<ext>", for error messages


def iter_shard(m: Manifest, index: int, skip: int, take: int, skips: SkipCounter
               ) -> Iterator[RawSample | None]:
    """Exactly ``take`` items: samples ``skip``.. of shard ``index``, ``None`` for each unusable one.

    Images stay encoded (decoding happens after the shuffle buffer, in the worker).
    A truncated or corrupt tar yields ``None`` for every sample it could not deliver.
    """
    url = m.shard_url(index)
    got = seen = 0
    try:
        stream = storage.open_stream(url)
    except FileNotFoundError:
        raise UserError(f"shard {url} listed in {m.url}/{MANIFEST} does not exist") from None
    with stream:
        try:
            for sample in _samples(stream, url):
                seen += 1
                if seen <= skip:
                    continue
                yield _parse(sample, url, len(m.classes), skips)
                got += 1
                if got == take:
                    return
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            reason = f"truncated or corrupt tar after {seen} samples ({_short(e)})"
        else:
            reason = f"holds {seen} samples but the manifest lists {m.shards[index]['count']} (truncated?)"
    skips.bad(f"shard {url}", reason, n=take - got)
    for _ in range(take - got):
        yield None


def _samples(stream, url: str) -> Iterator[dict]:
    """webdataset's tar member iterator grouped into samples by key."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    def members():
        for m in tar_file_iterator(stream):
            m["__url__"] = url
            yield m
    return group_by_keys(members())


def _parse(sample: dict, url: str, num_classes: int, skips: SkipCounter) -> RawSample | None:
    key = sample["__key__"]
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    where = f"{url}:{key}.{ext or '?'}"
    if ext is None:
        skips.bad(where, f"no image member (.png/.jpg); members: {_members(sample)}")
        return None
    if "cls" not in sample:
        skips.bad(where, f"no label member ({key}.cls); members: {_members(sample)}")
        return None
    try:
        label = int(sample["cls"].decode().strip())
    except (UnicodeDecodeError, ValueError):
        skips.bad(where, f"label {sample['cls'][:20]!r} is not an integer")
        return None
    if not 0 <= label < num_classes:
        skips.bad(where, f"label {label} is outside 0..{num_classes - 1}")
        return None
    return RawSample(key, sample[ext], label, where)


def _members(sample: dict) -> str:
    return ", ".join(f"{sample['__key__']}.{k}" for k in sample if not k.startswith("__")) or "none"


def _short(e: BaseException) -> str:
    text = str(e).split(" @ ")[0].strip()  # webdataset appends " @ <stream repr>"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ---------------------------------------------------------------- planning (pure functions)

def pieces(counts: list[int], order: list[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """(shard, skip, take) covering samples [start, stop) of the shards concatenated in ``order``."""
    out, offset = [], 0
    for s in order:
        lo, hi = max(start, offset), min(stop, offset + counts[s])
        if lo < hi:
            out.append((s, lo - offset, hi - lo))
        offset += counts[s]
        if offset >= stop:
            break
    return out


def epoch_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard order of an epoch: identical on every replica and worker, different every epoch."""
    import random
    order = list(range(n_shards))
    random.Random(f"moco_xla-shards/{seed}/{epoch}").shuffle(order)
    return order


@dataclass
class ShardSet:
    """A split of a shard set plus what a loader needs to turn members into model inputs."""

    manifest: Manifest
    transform: Callable
    channels: int
    image_size: int
    shuffle_buffer: int
    skips: SkipCounter

    def __len__(self) -> int:
        return self.manifest.total

    @property
    def classes(self) -> list[str]:
        return self.manifest.classes
