"""Shard sets whose images carry their own sample index, so tests can count what a loader delivered."""
from __future__ import annotations

import torch

from moco_xla.data.badsamples import SkipCounter
from moco_xla.data.datasets import TensorImages
from moco_xla.data.shardset import ShardSet, load_manifest
from moco_xla.data.transforms import TwoCrops
from moco_xla.shards import write_split

CLASSES = 5


def indexed_images(n: int, size: int = 8) -> TensorImages:
    """Image i holds i in its first two pixels (i // 256, i % 256); label i % CLASSES."""
    imgs = torch.randint(0, 256, (n, 1, size, size), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)
    idx = torch.arange(n)
    imgs[:, 0, 0, 0], imgs[:, 0, 0, 1] = (idx // 256).to(torch.uint8), (idx % 256).to(torch.uint8)
    return TensorImages(imgs, idx % CLASSES, classes=[f"c{i}" for i in range(CLASSES)])


def image_index(img: torch.Tensor) -> torch.Tensor:
    """Sample indices of a batch of uint8 images [B, 1, H, W] made by ``indexed_images``."""
    return img[:, 0, 0, 0].long() * 256 + img[:, 0, 0, 1].long()


def keep(img: torch.Tensor) -> torch.Tensor:
    """The identity transform (module level: picklable for DataLoader workers)."""
    return img


def write_indexed(out: str, n: int, shard_size: int, test_n: int = 0, seed: int | None = 0) -> None:
    """Shards of ``indexed_images(n)`` (train) and of ``test_n`` more (test) under ``out``."""
    meta = {"dataset": "digits", "classes": [f"c{i}" for i in range(CLASSES)], "channels": 1}
    write_split(indexed_images(n), out, "train", meta, shard_size, seed, progress=False)
    write_split(indexed_images(test_n or n), out, "test", meta, shard_size, seed, progress=False)


def shard_set(root: str, split: str = "train", views: bool = True, buffer: int = 16,
              policy: str = "error") -> ShardSet:
    transform = TwoCrops(keep) if views else keep
    return ShardSet(load_manifest(root, split), transform, 1, 8, buffer, SkipCounter(policy))
