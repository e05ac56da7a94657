"""Per-replica loaders with static shapes: every replica makes the same number of equal-size steps.

- ``pretrain_loader``: (view_q, view_k) batches; a DistributedSampler over a map-style
  dataset, or a ``PretrainStream`` over shards (steps computed from the manifest);
- ``eval_loader``: (image, label, valid) batches covering the first ``n`` samples once
  across replicas, padded to whole batches (padding marked invalid);
- ``gathered_order``: where sample i lands in an all_gather of eval_loader outputs.
"""
from __future__ import annotations

import itertools
import math
import os
import signal
import threading
from typing import Callable, Iterable

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..errors import UserError
from .badsamples import SkipCounter
from .images import BadImage
from .shardset import ShardSet
from .streams import EvalStream, PretrainStream

MAX_RETRIES = 32  # consecutive bad samples tolerated before a map-style dataset gives up


class Transformed(Dataset):
    """A raw dataset with a transform, bad-sample handling and label checks."""

    def __init__(self, base: Dataset, transform: Callable, num_classes: int, skips: SkipCounter) -> None:
        self.base, self.transform, self.num_classes, self.skips = base, transform, num_classes, skips

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        # A transform that decodes (transforms.CropViews) gets the encoded bytes where the dataset has them.
        read = getattr(self.base, "encoded", None) if getattr(self.transform, "decodes", False) else None
        for attempt in range(MAX_RETRIES):
            j = (i + attempt) % len(self.base)  # skip: the next sample stands in
            try:
                img, label = read(j) if read else self.base[j]
                if 0 <= label < self.num_classes:
                    return self.transform(img), label
            except (BadImage, OSError) as e:
                self.skips.bad(self._describe(j), f"cannot read image ({e})")
                continue
            self.skips.bad(self._describe(j), f"label {label} is outside 0..{self.num_classes - 1}")
        raise UserError(f"{MAX_RETRIES} consecutive bad samples from {self._describe(i)}: check the data")

    def _describe(self, i: int) -> str:
        describe = getattr(self.base, "describe", None)
        return describe(i) if describe else f"#{i} of {type(self.base).__name__}"


class EpochLoader:
    """This replica's batches for one epoch; ``len`` is the step count, the same on every replica.

    ``set_epoch(epoch, start_step)`` resumes a checkpoint taken mid-epoch: iteration starts at
    batch ``start_step``; ``seek`` skips the earlier batches without decoding them (map-style
    datasets and shard streams), else they are read and dropped.
    """

    def __init__(self, loader: DataLoader, steps: int, set_epoch: Callable[[int], None] | None,
                 seek: Callable[[int], None] | None = None) -> None:
        self.loader, self.steps, self._set_epoch, self._seek = loader, steps, set_epoch, seek
        self.start = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if self._set_epoch is not None:
            self._set_epoch(epoch)
        self.start = start_step
        if self._seek is not None:
            self._seek(start_step)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        batches = user_errors(self.loader)
        if self._seek is None:
            for _ in range(self.start):
                next(batches, None)
        for done in range(self.start, self.steps):
            batch = next(batches, None)
            if batch is None:  # a short replica would leave the others waiting in a collective
                raise UserError(f"the data loader ended after {done} of {self.steps} steps")
            yield batch
        batches.close()


class EvalLoader:
    """An eval DataLoader that reports bad data as one-line UserErrors."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return user_errors(self.loader)


def user_errors(loader: Iterable):
    """Iterate ``loader``; a UserError raised in a DataLoader worker comes back as its own one line.

    On any error the workers are stopped right away: left to the garbage collector, each
    one holds up the process for 5 s (DataLoader's join timeout).
    """
    it = iter(loader)
    try:
        yield from it
    except UserError as e:
        _stop_workers(it)
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else ""
        if "Original Traceback" in str(e) and "UserError: " in last:
            raise UserError(last.split("UserError: ", 1)[1]) from None
        raise
    except Exception:  # not GeneratorExit: closing early must keep persistent workers alive
        _stop_workers(it)
        raise


def _stop_workers(it) -> None:
    stop = getattr(it, "_shutdown_workers", None)
    if stop is not None:
        stop()


def pretrain_loader(ds: Dataset | ShardSet, batch: int, rank: int, world: int, seed: int, workers: int = 0,
                    max_steps: int = 0, pin_memory: bool | None = None) -> EpochLoader:
    """Shuffled (view_q, view_k) batches of ``batch`` per replica; every replica gets the same count.

    ``pin_memory`` (default: when CUDA is present) makes the step's ``non_blocking`` host-to-GPU
    copies asynchronous; from pageable memory they are synchronous.
    """
    pin = pin_default(pin_memory)
    steps = len(ds) // (batch * world)
    if steps == 0:
        raise UserError(f"dataset has {len(ds)} images: too few for a global batch of {batch * world}")
    if max_steps:
        steps = min(steps, max_steps)
    persistent = workers > 0
    # Worker seeds come from this generator, not the global RNG: a resumed run then draws the
    # same augmentations as an uninterrupted one (the global RNG is restored from the checkpoint).
    gen = torch.Generator()
    if isinstance(ds, ShardSet):
        stream = PretrainStream(ds, rank, world, batch, steps, seed)
        loader = DataLoader(stream, batch_size=batch, num_workers=workers, persistent_workers=persistent,
                            collate_fn=_collate_views, generator=gen, worker_init_fn=ignore_sigterm,
                            pin_memory=pin)
        return EpochLoader(loader, steps, _seeding(stream.set_epoch, gen, seed, rank), stream.seek)
    sampler = ResumableSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, drop_last=True, num_workers=workers,
                        persistent_workers=persistent, collate_fn=_collate_views, generator=gen,
                        worker_init_fn=ignore_sigterm, pin_memory=pin)
    return EpochLoader(loader, steps, _seeding(sampler.set_epoch, gen, seed, rank),
                       lambda step: setattr(sampler, "start", step * batch))


def pin_default(pin_memory: bool | None) -> bool:
    """Pin loader batches when asked, by default when a CUDA device is present."""
    return torch.cuda.is_available() if pin_memory is None else pin_memory


def ignore_sigterm(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM to their replica, which stops at an agreed step and
    checkpoints. A preempted VM signals every process; a worker dying of it first would crash
    the replica ("DataLoader worker is killed by signal") before it could save. SIGTERM from
    the replica itself (how multiprocessing ends workers at exit) still ends the worker."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it
    threading.Thread(target=_exit_on_sigterm_from, args=(os.getppid(),), daemon=True).start()


def _exit_on_sigterm_from(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


class ResumableSampler(DistributedSampler):
    """A DistributedSampler whose epoch can start at sample ``start`` (resuming mid-epoch)."""

    start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


def _seeding(set_epoch: Callable[[int], None], gen: torch.Generator, seed: int, rank: int
             ) -> Callable[[int], None]:
    def set_epoch_and_seed(epoch: int) -> None:
        set_epoch(epoch)
        gen.manual_seed((seed * 1000 + rank) * 100_000 + epoch)
    return set_epoch_and_seed


def _collate_views(samples):
    q = torch.stack([s[0][0] for s in samples])
    k = torch.stack([s[0][1] for s in samples])
    return q, k


class _Sharded(Dataset):
    """This replica's indices (rank, rank + world, ...), padded to a whole number of batches."""

    def __init__(self, base: Dataset, rank: int, world: int, batch: int, limit: int = 0) -> None:
        self.base = base
        n = min(len(base), limit) if limit else len(base)
        per = math.ceil(math.ceil(n / world) / batch) * batch
        self.indices = [rank + world * j for j in range(per)]
        self.n = n

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        idx = self.indices[i]
        valid = idx < self.n
        img, label = self.base[idx if valid else 0]
        return img, label if valid else -1, valid


def eval_loader(ds: Dataset | ShardSet, batch: int, rank: int, world: int, workers: int = 0, limit: int = 0,
                pin_memory: bool | None = None) -> EvalLoader:
    """Fixed-shape batches of (image, label, valid): each of the first ``limit`` samples once across replicas.

    Replica r holds samples r, r + world, ... (shards: a contiguous range of the same
    size); gathered in rank order, ``gathered_order`` gives where each sample lands.
    """
    if isinstance(ds, ShardSet):
        return EvalLoader(DataLoader(EvalStream(ds, rank, world, batch, limit), batch_size=batch,
                                     num_workers=workers, worker_init_fn=ignore_sigterm,
                                     pin_memory=pin_default(pin_memory)))
    return EvalLoader(DataLoader(_Sharded(ds, rank, world, batch, limit), batch_size=batch, shuffle=False,
                                 num_workers=workers, worker_init_fn=ignore_sigterm,
                                 pin_memory=pin_default(pin_memory)))


def gathered_order(n: int, world: int, batch: int) -> torch.Tensor:
    """Positions, in an all_gather of eval_loader outputs, of the n samples (each exactly once).

    For map-style datasets these come in dataset order; for shards in an order that is a
    fixed permutation of it (features and labels are gathered alike, so kNN is unaffected).
    """
    per = math.ceil(math.ceil(n / world) / batch) * batch
    idx = torch.arange(n)
    return (idx % world) * per + idx // world
