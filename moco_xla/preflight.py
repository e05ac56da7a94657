"""``python -m moco_xla.launch --check``: what a run needs, checked in under a minute, no training.

Same config, overrides and flags as the real run. One line per check, ``ok`` or ``FAIL`` with a
one-line reason; the exit status is nonzero when any line fails. Checked: the versions of torch,
torch_xla and libtpu (and that torch_xla matches torch), the devices and world size the launch
would use, the per-replica batch and BN groups, the data source (its first sample read), the
checkpoint directory (a file written and removed; shared storage when there are several hosts),
Kaggle's ``TPU_PROCESS_ADDRESSES``, and on XLA one training step compiled and run on the device.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata as metadata
import os
import time
from typing import Callable

from .config import Config, validate_world
from .errors import UserError


class CheckFailed(Exception):
    """A check's one-line reason."""


def run(args: argparse.Namespace, cfg: Config, backend: str) -> int:
    """Print every check's line; 0 when all are ok, else the user-error exit code."""
    from .errors import EXIT_USER
    world: list[int] = []
    checks: list[tuple[str, Callable[[], str]]] = [
        ("versions", versions),
        ("devices", lambda: devices(backend, args.cores, cfg, world)),
        ("batch", lambda: batch(cfg, world)),
        ("data", lambda: data_source(cfg)),
        ("checkpoints", lambda: checkpoints(cfg, args.out, backend, world)),
        ("kaggle", kaggle),
    ]
    if backend == "xla":
        checks.append(("compile", lambda: compile_step(cfg, world)))
    failed = 0
    for name, check in checks:
        try:
            line = f"ok    {name}: {check()}"
        except (CheckFailed, UserError) as e:
            failed += 1
            line = f"FAIL  {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        except Exception as e:  # noqa: BLE001 - anything else a check meets is its one-line reason too
            failed += 1
            line = f"FAIL  {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(line, flush=True)
    print(f"preflight: {'all ok' if not failed else f'{failed} check(s) failed'}", flush=True)
    return 0 if not failed else EXIT_USER


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> str:
    """torch, torch_xla and libtpu versions; torch_xla must be built for this torch (same x.y)."""
    import torch
    torch_v, xla_v = torch.__version__, _version("torch_xla")
    libtpu = _version("libtpu") or _version("libtpu-nightly")
    line = f"torch {torch_v}, torch_xla {xla_v or '-'}, libtpu {libtpu or '-'}"
    if xla_v and _minor(xla_v) != _minor(torch_v):
        raise CheckFailed(f"{line}: torch_xla {_minor(xla_v)} needs torch {_minor(xla_v)}; install matching "
                          f"releases (pip install torch=={_minor(xla_v)}.* torch_xla=={_minor(xla_v)}.*)")
    return line


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def devices(backend: str, cores: int | None, cfg: Config, world: list[int]) -> str:
    """The replicas on this host and in the job, as the launch would start them."""
    from .runtime.plan import replica_count, world_size
    here = replica_count(backend, cores)
    total = world_size(backend, here)
    validate_world(cfg, total)
    world.append(total)
    device = {"xla": f"PJRT_DEVICE={os.environ.get('PJRT_DEVICE', 'TPU')}", "cuda": "CUDA", "cpu": "gloo"}[backend]
    return f"backend {backend} ({device}), {here} replica(s) on this host, world size {total}"


def batch(cfg: Config, world: list[int]) -> str:
    """Per-replica batch and the BN groups it is normalised in."""
    if not world:
        raise CheckFailed("unknown world size (see devices)")
    n = world[0]
    per = cfg.train.batch_size // n
    splits = cfg.model.bn_splits
    if cfg.model.sync_bn:
        bn = f"SyncBN over the global batch of {cfg.train.batch_size}"
    else:
        bn = f"BN groups of {per // max(1, splits)} (Split BN {splits} per replica)"
    return f"global {cfg.train.batch_size} = {n} x {per} per replica; {bn}; shuffle {cfg.moco.shuffle}"


def data_source(cfg: Config) -> str:
    """The data section checked, and its first training sample read (first file or shard)."""
    from . import data
    t0 = time.time()
    data.check(cfg)
    bundle = data.build(cfg)
    where = cfg.data.root or "bundled"
    if isinstance(bundle.bank, data.ShardSet):  # streamed: open the first shard, read its first bytes
        url = bundle.bank.manifest.shard_url(0)
        with data.storage.open_stream(url) as f:
            head = f.read(512)
        first = f"first shard {url} opened ({len(head)} bytes read)"
    else:
        x, _ = bundle.bank[0]
        first = f"first sample read ({tuple(x.shape)})"
    return f"{cfg.data.dataset} from {where}: {len(bundle.bank)} train samples, {first} in {time.time() - t0:.1f} s"


def checkpoints(cfg: Config, out: str | None, backend: str, world: list[int]) -> str:
    """The checkpoint directory takes a file (written, read back, removed); gs:// with several hosts."""
    from .checkpoint import checkpoint_dir
    from .data import storage
    from .runtime import hosts
    directory = checkpoint_dir(cfg, out or "runs/preflight")
    storage.check_writable(directory)
    n_hosts = hosts(backend)
    if n_hosts > 1 and not storage.is_remote(directory):
        raise CheckFailed(f"{directory} is local but the job runs on {n_hosts} hosts; set "
                          f"checkpoint.dir=gs://BUCKET/PATH")
    probe = storage.join(directory, f".preflight-{os.getpid()}")
    try:
        storage.write_bytes(probe, b"moco_xla preflight")
        if storage.read_bytes(probe) != b"moco_xla preflight":
            raise CheckFailed(f"{directory}: a file written there reads back differently")
    except OSError as e:
        raise CheckFailed(f"{directory} is not writable ({e})") from None
    finally:
        _remove(probe)
    shared = f"shared by {n_hosts} hosts" if n_hosts > 1 else "this host"
    return f"{directory} writable ({shared})"


def _remove(path: str) -> None:
    from .data import storage
    try:
        fs, p = storage.filesystem(path)
        if fs.exists(p):
            fs.rm(p)
    except OSError:
        pass


def kaggle() -> str:
    """Kaggle's TPU image sets TPU_PROCESS_ADDRESSES=local; the launcher removes it before spawning."""
    value = os.environ.get("TPU_PROCESS_ADDRESSES")
    if value is not None and value.strip().lower() == "local":
        return "TPU_PROCESS_ADDRESSES=local (Kaggle): removed before the replicas start"
    return f"TPU_PROCESS_ADDRESSES {'unset' if value is None else 'set to ' + value}"


def compile_step(cfg: Config, world: list[int]) -> str:
    """One training step of this config at the per-replica batch, compiled and run on one XLA device."""
    import torch
    from .runtime import make_runtime
    from .train import build_model, build_optimizer
    cfg = copy.deepcopy(cfg)
    per = cfg.train.batch_size // (world[0] if world else 1)
    rt = make_runtime("xla")
    model = build_model(cfg, rt)
    opt = build_optimizer(cfg, model)
    shape = (per, cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
    t0 = time.time()
    with rt.autocast(cfg.train.precision):
        loss, _ = model(torch.randn(shape).to(rt.device), torch.randn(shape).to(rt.device))
    opt.zero_grad(set_to_none=True)
    rt.backward_step(loss, opt)
    rt.mark_step()
    value = float(loss.detach().cpu())
    compiles = rt.counters().get("compiles", 0)
    if value != value:
        raise CheckFailed(f"the step's loss is NaN on {rt.device}")
    return (f"one step of batch {per} ({rt.resolve_precision(cfg.train.precision)}) on {rt.device}: "
            f"{compiles} graph(s) compiled and run in {time.time() - t0:.1f} s, loss {value:.3f}")

