"""Shuffle BN: encode the keys in batches that mix samples from every replica.

Why: BN statistics computed on a replica's own batch let the query find its
positive key through the batch mean and variance (the "leak"), and the loss
stalls. Shuffling the key batch across replicas before the key encoder, then
putting the keys back, closes the leak (MoCo, He et al. 2020, Sec. 3.3).

Two modes, same contract ``keys = unshuffle(encode(shuffle(images)))``:
- ``gather`` (the official recipe): gather all N x B key images, apply one random
  permutation that every replica agrees on (shared by broadcast), each replica
  encodes its slice, gather the keys and undo the permutation.
- ``all_to_all`` (communication-light): each replica permutes its own batch and
  sends B/N images to every replica; keys come back the same way. Moves B images
  per replica instead of N x B.
Both are built from the Runtime's collectives, so they run unchanged on TPU
(xm.all_gather / xm.all_reduce / xm.all_to_all), on GPUs (NCCL) and on CPUs (gloo).
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from .runtime import Runtime

MODES = ("gather", "all_to_all", "none")


def resolve_mode(rt: Runtime, mode: str) -> str:
    """The mode to run: ``all_to_all`` becomes ``gather`` (with a warning) where the backend lacks it."""
    if mode not in MODES:
        raise ValueError(f"unknown shuffle mode {mode!r}; valid: {', '.join(MODES)}")
    if mode == "all_to_all" and not rt.has_all_to_all:
        warnings.warn(f"moco.shuffle=all_to_all: backend {rt.name} has no all_to_all; using gather "
                      f"(same keys, {rt.world_size}x the shuffle traffic)", RuntimeWarning, stacklevel=2)
        return "gather"
    return mode


def shared_permutation(rt: Runtime, n: int, device: torch.device) -> torch.Tensor:
    """A random permutation of range(n), identical on every replica.

    Replica 0 draws n random keys and broadcasts them; every replica argsorts the
    same keys. Drawn on the device (no host sync, static shape).
    """
    keys = rt.broadcast(torch.rand(n, device=device), src=0)
    return torch.argsort(keys)


def shuffle_gather(rt: Runtime, x: torch.Tensor, perm: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather all replicas' batches, permute, keep this replica's slice.

    Returns (this replica's slice of the shuffled global batch, the global permutation).
    """
    x_all = rt.all_gather(x)
    if perm is None:
        perm = shared_permutation(rt, x_all.shape[0], x.device)
    idx_this = perm.view(rt.world_size, -1).index_select(0, rt.rank_index).view(-1)
    return x_all.index_select(0, idx_this), perm


def unshuffle_gather(rt: Runtime, k: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Gather the encoded slices and return this replica's keys in their original order."""
    k_all = rt.all_gather(k)                       # row i is the key of global sample perm[i]
    idx_unshuffle = torch.argsort(perm.int())  # int32 keys: TPUs emulate 64-bit sorts
    idx_this = idx_unshuffle.view(rt.world_size, -1).index_select(0, rt.rank_index).view(-1)
    return k_all.index_select(0, idx_this)


def shuffle_all_to_all(rt: Runtime, x: torch.Tensor, perm: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Permute the local batch and send B/N of it to every replica (one all_to_all).

    Every replica's BN batch then holds a random B/N of each replica's samples.
    Returns (mixed batch, the local permutation).
    """
    if perm is None:
        perm = torch.argsort(torch.rand(x.shape[0], device=x.device))
    # x[perm], not x.index_select(0, perm): XLA (2.9) aborts on an index_select whose index
    # comes from a sort in the same graph as an all-to-all ("Check failed: buffer != nullptr").
    return rt.all_to_all(x[perm]), perm


def unshuffle_all_to_all(rt: Runtime, k: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Send every key back to its owner (all_to_all is its own inverse here) and un-permute."""
    return rt.all_to_all(k)[torch.argsort(perm.int())]  # int32 keys: TPUs emulate 64-bit sorts


def shuffled_keys(rt: Runtime, encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                  mode: str = "gather", perm: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode key images with shuffle BN. Returns (keys in x's order, the permutation used).

    ``mode='none'`` encodes in place (for SyncBN, or Split BN on one replica where
    the local batch is shuffled so sub-batches are random).
    """
    if mode == "gather":
        x_s, perm = shuffle_gather(rt, x, perm)
        return unshuffle_gather(rt, encode(x_s), perm), perm
    if mode == "all_to_all":
        x_s, perm = shuffle_all_to_all(rt, x, perm)
        return unshuffle_all_to_all(rt, encode(x_s), perm), perm
    if mode == "none":
        return encode(x), None
    raise ValueError(f"unknown shuffle mode {mode!r}; valid: {', '.join(MODES)}")


def bytes_per_step(mode: str, world_size: int, batch: int, image_numel: int, key_dim: int,
                   elem_bytes: int = 4, key_bytes: int | None = None) -> int:
    """Bytes one replica receives per shuffle (images there, keys back), counted from the shapes.

    ``batch`` is the per-replica batch. gather receives every other replica's batch,
    (N - 1) B rows each way; all_to_all only B / N rows from each other replica,
    (N - 1) B / N. ``key_bytes`` is the key's element size (2 when the encoder runs in
    bf16); the 4 N B-byte permutation broadcast of gather mode is not counted.
    profiling.collectives() reads the same figures from the lowered XLA graph.
    """
    key_bytes = elem_bytes if key_bytes is None else key_bytes
    per_row = image_numel * elem_bytes + key_dim * key_bytes
    if mode == "gather":
        return (world_size - 1) * batch * per_row
    if mode == "all_to_all":
        return (world_size - 1) * (batch // world_size) * per_row
    return 0
