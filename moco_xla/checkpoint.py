"""Checkpoints that survive preemption: atomic writes to a local directory or gs://, exact resume.

A checkpoint is one ``torch.save`` dict::

    {'format': 1, 'config': Config.to_dict(), 'model': MoCo state_dict (both encoders, queue,
     queue_ptr), 'optimizer', 'scaler', 'epoch', 'step_in_epoch', 'global_step', 'lr',
     'world_size', 'rng': [uint8 tensor per rank], 'sums': epoch loss/acc sums, 'progress': {...}}

Layout of a checkpoint directory (``<out>/checkpoints`` or ``checkpoint.dir``)::

    ckpt-000000120.pt    the checkpoint after global step 120
    ckpt-000000120.json  its metadata (config, position); written after the .pt: the commit mark
    latest               the name of the newest committed checkpoint; written last

Files go through data/storage.py (local or gs://): locally every file is written under a temporary
name and renamed (atomic on POSIX); on GCS an object appears only once its upload completes. A crash at any moment therefore leaves either
the previous ``latest`` or the new one, never a broken one. Only the master replica writes.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .config import Config
from .data.storage import exists, filesystem, is_remote, join, read_bytes, write_bytes
from .errors import UserError
from .runtime import Runtime

FORMAT = 1
LATEST = "latest"
PREFIX, SUFFIX = "ckpt-", ".pt"
# Keys that may change on resume: they change neither the model nor the data order.
RESUME_MUTABLE = ("name", "train.epochs", "train.lr", "train.log_every", "train.stop_every", "train.collapse_warn",
                  "train.compile", "train.compile_backend", "model.channels_last",
                  "train.precision", "data.root", "data.workers", "data.on_bad_sample", "eval.",
                  "checkpoint.")


# ----------------------------------------------------------------------------- layout

def checkpoint_dir(cfg: Config, out_dir: str | os.PathLike) -> str:
    return cfg.checkpoint.dir or str(Path(out_dir) / "checkpoints")


def checkpoint_name(global_step: int) -> str:
    return f"{PREFIX}{global_step:09d}{SUFFIX}"


def _committed(directory: str) -> list[str]:
    """Names of committed checkpoints (a .pt with its .json), oldest first."""
    fs, p = filesystem(directory)
    if not fs.exists(p):
        return []
    names = {Path(str(f)).name for f in fs.ls(p, detail=False)}
    return sorted(n for n in names if n.startswith(PREFIX) and n.endswith(SUFFIX)
                  and n[: -len(SUFFIX)] + ".json" in names)


def latest_checkpoint(directory: str | os.PathLike) -> str | None:
    """Path of the newest committed checkpoint in ``directory`` (or ``<directory>/checkpoints``)."""
    directory = str(directory)
    for d in (directory, join(directory, "checkpoints")):
        try:
            pointer = read_bytes(join(d, LATEST)).decode().strip()
            if pointer and exists(join(d, pointer)):
                return join(d, pointer)
        except (FileNotFoundError, NotADirectoryError):
            pass
        names = _committed(d)
        if names:
            return join(d, names[-1])
    return None


class CheckpointStore:
    """Writes checkpoints into one directory and keeps the newest ``keep``."""

    def __init__(self, directory: str, keep: int) -> None:
        self.dir, self.keep = str(directory), keep

    def write(self, payload_bytes: bytes, meta: dict[str, Any]) -> str:
        """Commit one checkpoint: the .pt, then its .json, then ``latest``; prune old ones."""
        name = checkpoint_name(meta["global_step"])
        path = join(self.dir, name)
        write_bytes(path, payload_bytes)
        write_bytes(path[: -len(SUFFIX)] + ".json", json.dumps(meta, indent=1).encode())
        write_bytes(join(self.dir, LATEST), name.encode())
        self.prune(name)
        return path

    def prune(self, newest: str) -> None:
        """Delete all but the newest ``keep`` checkpoints and temporary files of dead writers."""
        fs, p = filesystem(self.dir)
        names = _committed(self.dir)
        keep = set(names[-self.keep:]) | {newest}
        for n in names:
            if n in keep:
                continue
            for f in (n, n[: -len(SUFFIX)] + ".json"):
                try:
                    fs.rm(join(p, f))
                except FileNotFoundError:
                    pass
        if not is_remote(self.dir):
            for tmp in Path(self.dir).glob(f".{PREFIX}*.tmp-*"):
                tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- reading

def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict (CPU tensors). UserError if it is missing or not a moco_xla checkpoint."""
    path = str(path)
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"checkpoint {path} is a directory; pass a ckpt-*.pt file or use "
                        f"--resume auto") from None
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle errors, not a torch file at all
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); pass another checkpoint") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not a moco_xla checkpoint (no 'model' and 'config' entries)")
    if ckpt.get("format", FORMAT) > FORMAT:
        raise UserError(f"checkpoint {path} has format {ckpt['format']}, newer than this moco_xla "
                        f"reads ({FORMAT}); upgrade moco_xla")
    return ckpt


def checkpoint_meta(path: str) -> dict[str, Any]:
    """Config and position of a checkpoint, from its small .json when there is one."""
    side = path[: -len(SUFFIX)] + ".json" if path.endswith(SUFFIX) else None
    if side:
        try:
            return json.loads(read_bytes(side))
        except (FileNotFoundError, ValueError):
            pass
    ckpt = load_checkpoint(path)
    return {k: ckpt.get(k) for k in ("config", "epoch", "step_in_epoch", "global_step", "world_size")}


def resolve_resume(arg: str | None, directory: str) -> str | None:
    """``--resume``: None -> fresh start, 'auto' -> latest in ``directory`` or None, else a path."""
    if arg is None:
        return None
    if arg == "auto":
        return latest_checkpoint(directory)
    return find_checkpoint(arg, "--resume", "a ckpt-*.pt file, a checkpoint directory, a run's --out "
                                            "directory, or 'auto'")


def find_checkpoint(arg: str, flag: str = "--ckpt",
                    valid: str = "a ckpt-*.pt file, a checkpoint directory or a run directory") -> str:
    """A checkpoint file, or the newest committed one in a checkpoint or run directory (local or gs://).

    ``flag`` and ``valid`` name the option and what it accepts in the one-line errors.
    """
    try:
        fs, p = filesystem(arg)
        is_dir = fs.isdir(p)
        found = is_dir or fs.exists(p)
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"{flag} {arg}: cannot read it ({e})") from None
    if not found:
        raise UserError(f"{flag} {arg} does not exist; pass {valid}")
    if is_dir:
        path = latest_checkpoint(arg)
        if path is None:
            raise UserError(f"{flag} {arg} holds no committed checkpoint (ckpt-*.pt with its .json)")
        return path
    return arg


def check_compatible(saved: dict[str, Any], cfg: Config, source: str) -> list[str]:
    """UserError naming every key (outside RESUME_MUTABLE) that differs; returns changed mutable keys."""
    old, new = _flatten(saved), _flatten(cfg.to_dict())
    differ = [k for k in new if k in old and _norm(old[k]) != _norm(new[k])]
    fatal = [k for k in differ if not k.startswith(RESUME_MUTABLE)]
    if fatal:
        k = fatal[0]
        more = f" (also differs: {', '.join(fatal[1:])})" if len(fatal) > 1 else ""
        raise UserError(f"checkpoint {source} was written with {k}={old[k]!r} but this run has "
                        f"{k}={new[k]!r}{more}; resume with the same value or start a new --out")
    return differ


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


# ----------------------------------------------------------------------------- training state

@dataclass
class Position:
    """Where a run stands: the epoch in progress, steps done in it, and what the summary needs."""

    epoch: int = 0                  # 0-based epoch in progress (== train.epochs when finished)
    step: int = 0                   # steps done in ``epoch``
    global_step: int = 0
    knn_top1: float | None = None
    knn_epoch: int = 0              # the epoch (1-based) knn_top1 was measured after
    final_loss: float | None = None
    images_per_s: float = 0.0
    wall_s: float = 0.0             # training time so far, over every resumed run


def gather_rows(rt: Runtime, t: torch.Tensor) -> torch.Tensor:
    """Every replica's ``t`` (1-D, same length everywhere) as a CPU tensor [world, n]."""
    return rt.all_gather(t.to(rt.device).unsqueeze(0)).cpu()


def save_checkpoint(rt: Runtime, store: CheckpointStore, cfg: Config, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scaler: Any, pos: Position, lr: float,
                    epoch_sums: torch.Tensor) -> str:
    """Every replica calls this at the same step: RNG states and epoch sums are gathered
    (collectives), the master writes, the others wait. Returns the checkpoint's path.

    The RNG state recorded is the one training continues from: on XLA every graph sync steps
    the device seed, so the syncs of saving itself are undone by setting the state back.
    """
    rt.mark_step()
    mine = rt.rng_state()
    rng = gather_rows(rt, mine.to(torch.int32)).to(torch.uint8)
    sums = gather_rows(rt, epoch_sums.detach().float())
    path = join(store.dir, checkpoint_name(pos.global_step))
    if rt.is_master:
        payload = {
            "format": FORMAT, "config": cfg.to_dict(), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
            "epoch": pos.epoch, "step_in_epoch": pos.step, "global_step": pos.global_step, "lr": lr,
            "world_size": rt.world_size, "rng": list(rng), "sums": list(sums),
            "progress": dataclasses.asdict(pos),
        }
        buf = io.BytesIO()
        rt.save(payload, buf)
        meta = {k: payload[k] for k in ("format", "epoch", "step_in_epoch", "global_step", "lr",
                                        "world_size", "config")}
        store.write(buf.getvalue(), meta)
    rt.barrier()
    cpu = rt.cpu_rng_state()  # unchanged by saving, but a prefetching loader thread may use it
    rt.set_rng_state(torch.cat([cpu, mine[cpu.numel():]]))
    return path


def restore(ckpt: dict[str, Any], rt: Runtime, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scaler: Any) -> tuple[Position, torch.Tensor, Callable[[], None]]:
    """Load a checkpoint into this replica: returns its Position, this replica's epoch sums and
    a function that restores the RNG, to call right before the first step (on XLA, every sync
    in between would step the device seed).

    With the world size it was written with, each replica gets back its own RNG state, so the
    run continues bit-identically. Otherwise the data order is still exact (positions count
    global samples) but replicas re-seed: augmentations differ from an uninterrupted run.
    """
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    pos = Position(**ckpt["progress"])
    same_world = len(ckpt["rng"]) == rt.world_size
    if same_world:
        state = ckpt["rng"][rt.rank]
        sums = ckpt["sums"][rt.rank]

        def rng() -> None:
            rt.set_rng_state(state)
    else:
        seed = ckpt["config"]["train"]["seed"] * 1000 + rt.rank + 7919 * pos.global_step
        sums = torch.stack(list(ckpt["sums"])).mean(0)
        if rt.is_master:
            warnings.warn(f"checkpoint written by {len(ckpt['rng'])} replicas, resuming on "
                          f"{rt.world_size}: same data order, new augmentation draws", RuntimeWarning)

        def rng() -> None:
            rt.manual_seed(seed)
    return pos, sums.clone(), rng
