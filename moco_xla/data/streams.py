"""Streaming shard sets into fixed-size batches, split across replicas and DataLoader workers.

Pre-training (``PretrainStream``), per epoch:
  1. all replicas shuffle the shard order with the same seed (``epoch_order``) and
     concatenate the shards into one virtual sequence;
  2. the first ``steps * world * batch`` samples are used, the rest (less than one
     global batch, different every epoch) is dropped; replica r owns the contiguous
     range ``[r * steps * batch, (r + 1) * steps * batch)`` and each of its DataLoader
     workers a run of whole batches inside it, so every sample is read once per epoch
     by exactly one worker, and every replica makes exactly ``steps`` steps;
  3. a worker streams its range (at most two partial shards), shuffles it through a
     seeded buffer of ``data.shuffle_buffer`` encoded samples, then decodes and augments.

Evaluation (``EvalStream``) covers each of the first ``n`` samples once across replicas in
the fixed-shape, padded layout of ``eval_loader`` (see ``loaders.gathered_order``).

The filesystem (gcsfs) is opened lazily inside ``__iter__``, i.e. in the worker process.
"""
from __future__ import annotations

import math
import random
from itertools import chain, islice
from typing import Callable, Iterable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import UserError
from .images import BadImage, decode_bytes
from .shardset import RawSample, ShardSet, epoch_order, iter_shard, pieces


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def pretrain_range(rank: int, batch: int, steps: int, worker: int, workers: int) -> tuple[int, int]:
    """Samples [start, stop) of the epoch sequence read by ``worker`` of replica ``rank``."""
    base = rank * steps * batch
    first, last = steps * worker // workers, steps * (worker + 1) // workers
    return base + first * batch, base + last * batch


def shuffled(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """A seeded shuffle buffer: yields each item once, in an order mixed over ``size`` items."""
    buf: list = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = x
    rng.shuffle(buf)
    yield from buf


def decoded(items: Iterable[RawSample | None], channels: int, skips, decode: Callable | None = None
            ) -> Iterator[tuple | None]:
    """(uint8 image, label) per item (``decode(bytes)`` instead of decode_bytes where given);
    ``None`` for items already bad or whose image will not decode."""
    for s in items:
        if s is None:
            yield None
            continue
        try:
            yield (decode(s.data) if decode else decode_bytes(s.data, channels)), s.label
        except BadImage as e:
            skips.bad(s.where, f"cannot decode image ({e})")
            yield None


def substituted(items: Iterable[tuple | None], where: str) -> Iterator[tuple]:
    """Replace each ``None`` with a good sample (the next one, or the last one) so counts stay exact."""
    pending, last = 0, None
    for x in items:
        if x is None:
            if last is None:
                pending += 1
            else:
                yield last
            continue
        last = x
        yield x
        for _ in range(pending):
            yield x
        pending = 0
    if pending:
        raise UserError(f"no usable sample in {where}: every sample of this worker's range was bad")


def delivered(batches: list[int], steps: int) -> tuple[list[int], int]:
    """(batches each worker has delivered after ``steps`` DataLoader steps, the worker due next).

    The DataLoader takes one batch from each worker in turn, passing over workers
    that have run out (worker w holds ``batches[w]``).
    """
    out = [0] * len(batches)
    for r in range(max(batches, default=0)):
        for w, n in enumerate(batches):
            if n > r:
                if steps == 0:
                    return out, w
                out[w] += 1
                steps -= 1
    return out, 0


class PretrainStream(IterableDataset):
    """((view_q, view_k), label) for one replica.

    ``set_epoch`` and ``seek`` (resume mid-epoch) write to shared memory, so persistent
    workers see them; a resumed worker drops the samples already consumed before decoding.
    """

    def __init__(self, shards: ShardSet, rank: int, world: int, batch: int, steps: int, seed: int) -> None:
        self.shards, self.rank, self.world, self.batch, self.steps, self.seed = \
            shards, rank, world, batch, steps, seed
        self.state = torch.zeros(2, dtype=torch.int64).share_memory_()  # epoch, first step

    def set_epoch(self, epoch: int) -> None:
        self.state[0] = epoch

    def seek(self, step: int) -> None:
        self.state[1] = step

    def __len__(self) -> int:
        return (self.steps - int(self.state[1])) * self.batch

    def plan(self, epoch: int, worker: int, workers: int) -> list[tuple[int, int, int]]:
        """(shard, skip, take) pieces this worker reads in ``epoch``."""
        m = self.shards.manifest
        start, stop = pretrain_range(self.rank, self.batch, self.steps, worker, workers)
        return pieces(m.counts, epoch_order(len(m.shards), self.seed, epoch), start, stop)

    def __iter__(self):
        physical, workers = _worker()
        epoch, start = (int(v) for v in self.state)
        per_worker = [self.steps * (w + 1) // workers - self.steps * w // workers for w in range(workers)]
        done, due = delivered(per_worker, start)
        # Resuming: the DataLoader asks worker 0 first, so it plays the part of the worker due
        # next; the remaining batches then arrive in the uninterrupted run's order.
        worker = (physical + due) % workers
        done = done[worker]
        s = self.shards
        raw = chain.from_iterable(iter_shard(s.manifest, *p, s.skips) for p in self.plan(epoch, worker, workers))
        rng = random.Random(f"moco_xla-buffer/{self.seed}/{epoch}/{self.rank}/{worker}")
        order = islice(shuffled(raw, s.shuffle_buffer, rng), done * self.batch, None)
        if getattr(s.transform, "decodes", False):  # transforms.CropViews: decodes and crops in one pass
            items = decoded(order, s.channels, s.skips, decode=s.transform)
            yield from substituted(items, f"{s.manifest.url} (replica {self.rank}, worker {worker})")
            return
        items = decoded(order, s.channels, s.skips)
        for img, label in substituted(items, f"{s.manifest.url} (replica {self.rank}, worker {worker})"):
            yield s.transform(img), label


def eval_layout(n: int, world: int, batch: int) -> tuple[int, list[int], list[int]]:
    """(positions per replica, valid samples per replica, first sample of each replica).

    Replica r holds as many valid samples as ``range(r, n, world)`` has, as a prefix of its
    ``per`` positions, so ``gathered_order(n, world, batch)`` selects exactly the valid ones.
    """
    per = math.ceil(math.ceil(n / world) / batch) * batch
    counts = [len(range(r, n, world)) for r in range(world)]
    starts = [sum(counts[:r]) for r in range(world)]
    return per, counts, starts


def eval_worker_batches(count: int, per: int, batch: int, worker: int, workers: int
                        ) -> tuple[int, list[int]]:
    """(offset of the worker's first sample within the replica, valid samples in each of its batches).

    A worker owns batches worker, worker + workers, ...: the DataLoader returns worker
    batches round-robin, so the replica sees its batches in order and padding last.
    """
    valid = [max(0, min(batch, count - b * batch)) for b in range(per // batch)]
    offset = sum(v for b, v in enumerate(valid) if b % workers < worker)
    return offset, valid[worker::workers]


class EvalStream(IterableDataset):
    """(image, label, valid) for one replica: its share of the first ``n`` samples, then padding."""

    def __init__(self, shards: ShardSet, rank: int, world: int, batch: int, limit: int = 0) -> None:
        self.shards, self.rank, self.world, self.batch = shards, rank, world, batch
        self.n = min(len(shards), limit) if limit else len(shards)
        self.per, counts, starts = eval_layout(self.n, world, batch)
        self.count, self.start = counts[rank], starts[rank]

    def __len__(self) -> int:
        return self.per

    def __iter__(self):
        worker, workers = _worker()
        s = self.shards
        offset, valid = eval_worker_batches(self.count, self.per, self.batch, worker, workers)
        start = self.start + offset
        plan = pieces(s.manifest.counts, list(range(len(s.manifest.shards))), start, start + sum(valid))
        raw = chain.from_iterable(iter_shard(s.manifest, *p, s.skips) for p in plan)
        items = substituted(decoded(raw, s.channels, s.skips), f"{s.manifest.url} (eval worker {worker})")
        pad = s.transform(torch.zeros(s.channels, s.image_size, s.image_size, dtype=torch.uint8))
        for v in valid:
            for _ in range(v):
                img, label = next(items)
                yield s.transform(img), label, True
            for _ in range(self.batch - v):
                yield pad, -1, False
