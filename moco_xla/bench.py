"""``python -m moco_xla.bench``: how close MoCo runs to the hardware, as ratios that travel.

    python -m moco_xla.bench --backend cpu,xla          # this machine: CPU eager and XLA:CPU
    python -m moco_xla.bench --backend xla              # a TPU VM: one TPU core
    python -m moco_xla.bench --backend cuda             # a GPU box: ResNet-50, 224 px, AMP
    python -m moco_xla.bench --quick --out /tmp/b       # seconds: tiny model (tests)

Absolute images/s say more about the machine than about the code, so the headline
is a ratio on the same encoder, batch, precision and backend: MoCo step images/s
over a supervised step's. MoCo runs the encoder forward twice (query and key) and
backward once, a supervised step forward and backward once; with a backward pass
costing about two forwards the physical limit is 3/4 = 0.75. What the code adds on
top (shuffle BN, momentum update, queue) shows as the gap below 0.75.

Also measured: XLA compilations and host fallbacks after warm-up (goal 0 and 0),
peak host and device memory, the input pipeline's images/s against the step's,
and the bytes each shuffle-BN mode moves per step, counted from the shapes and
read from the lowered XLA graph. Results go to ``<out>/bench.json``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import RunStopped, UserError

ROOT = Path(__file__).resolve().parent.parent
SHUFFLE_WORLDS = (8, 32)  # a v3-8 / v4-8 host, and a 32-core slice


@dataclass
class Workload:
    """One benchmark setting: the same for the MoCo and the supervised step."""

    arch: str = "small_resnet"
    width: int = 32
    image_size: int = 32
    channels: int = 3
    small_stem: bool = True
    batch: int = 64             # per replica
    classes: int = 10           # supervised head
    K: int = 4096
    dim: int = 128
    bn_splits: int = 8
    precision: str = "auto"
    warmup: int = 3
    steps: int = 5
    rounds: int = 5             # interleave MoCo, supervised and key-forward timings; best round counts
    threads: int = 0            # torch intra-op threads (0: torch's default, one per core)
    compile: bool = False       # torch.compile the encoders (train.compile), CPU and CUDA


def workload_for(backend: str, quick: bool) -> Workload:
    """Defaults: a tiny model (--quick), a small ResNet at 32 px (CPU, XLA), ResNet-50 at 224 px (CUDA)."""
    if quick:
        return Workload(width=8, image_size=16, channels=1, batch=16, K=256, dim=16, bn_splits=2,
                        warmup=2, steps=2, rounds=1)
    if backend == "cuda":
        return Workload(arch="resnet50", image_size=224, small_stem=False, batch=128, classes=1000,
                        K=65536, bn_splits=1, warmup=10, steps=20)
    if backend == "xla" and _tpu_attached():
        return Workload(arch="resnet50", image_size=224, small_stem=False, batch=128, classes=1000,
                        K=65536, bn_splits=1, warmup=5, steps=20)
    return Workload()


# ----------------------------------------------------------------------------- the two steps

def build_models(w: Workload, rt) -> tuple[nn.Module, nn.Module]:
    """(MoCo, supervised classifier) on the same encoder architecture, on the runtime's device."""
    from .models import build_encoder, to_channels_last
    from .moco import MoCo

    mcfg = _model_config(w)
    torch.manual_seed(0)
    moco = MoCo(build_encoder(mcfg, rt), rt, w.dim, w.K, 0.999, 0.2, symmetric=False,
                shuffle="gather").to(rt.device)
    enc = build_encoder(mcfg, rt)
    sup = nn.Sequential(enc.backbone, nn.Linear(enc.feat_dim, w.classes)).to(rt.device)
    for model in (moco, sup):  # as training runs them: channels-last on CUDA (model.channels_last)
        to_channels_last(model, mcfg, rt.device)
    return moco.train(), sup.train()


def make_step(rt, model: nn.Module, params, precision: str, moco: bool, overlap: bool = True
              ) -> Callable[..., torch.Tensor]:
    """One training step, as train.py runs it (autocast forward, backward, optimizer_step).

    ``overlap=False``: the base Runtime's backward_step, one flattened all_reduce after the
    whole backward (moco_xla before its gradient buckets), for comparison.
    """
    from .optim import prime_momentum
    from .runtime import Runtime
    opt = torch.optim.SGD(params, lr=0.03, momentum=0.9, weight_decay=1e-4)
    prime_momentum(opt)
    scaler = rt.grad_scaler(precision)
    backward_step = rt.backward_step if overlap else partial(Runtime.backward_step, rt)

    def step(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with rt.autocast(precision):
            loss = model(a, b)[0] if moco else F.cross_entropy(model(a).float(), b)
        opt.zero_grad(set_to_none=True)
        backward_step(loss, opt, scaler)  # all-reduced gradients, then the step
        return loss.detach()
    step.model = model  # type: ignore[attr-defined]
    return step


def time_steps(rt, step: Callable, args: tuple, steps: int) -> tuple[float, float]:
    """(wall, this process's CPU) seconds per step; each step cut by mark_step as the loader does.

    The CPU seconds matter on a shared host: other processes' load stretches wall time, not
    the CPU time this process spends (for CUDA only the wall time means anything).
    """
    rt.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step(*args)
        rt.mark_step()
    rt.wait()
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def bench_backend(backend: str, w: Workload) -> dict[str, Any]:
    """Everything measured inside one backend's process."""
    from .profiling import peak_rss_bytes
    from .runtime import make_runtime

    if w.threads:
        torch.set_num_threads(w.threads)
    rt = make_runtime(backend)
    precision = rt.resolve_precision(w.precision)
    torch.manual_seed(0)
    moco, sup = build_models(w, rt)
    if w.compile:  # as train.compile does: in place, both encoders (and the supervised network)
        for module in (moco.encoder_q, moco.encoder_k, sup):
            module.compile()
    shape = (w.batch, w.channels, w.image_size, w.image_size)
    x = torch.randn(shape)  # made on the host, copied once: device data for every step
    im_q, im_k = x.to(rt.device), (x + 0.1 * torch.randn(shape)).to(rt.device)
    labels = torch.randint(0, w.classes, (w.batch,)).to(rt.device)
    moco_step = make_step(rt, moco, moco.encoder_q.parameters(), precision, moco=True)
    sup_step = make_step(rt, sup, sup.parameters(), precision, moco=False)

    def key_forward(a: torch.Tensor) -> None:  # the one pass MoCo adds: the key encoder, no grad
        with torch.no_grad(), rt.autocast(precision):
            moco.encoder_k(a)

    steps = {"moco": (moco_step, (im_q, im_k)), "supervised": (sup_step, (im_q, labels)),
             "key_forward": (key_forward, (im_k,))}
    for _ in range(w.warmup):  # compile (XLA) and settle allocators
        for fn, args in steps.values():
            fn(*args)
            rt.mark_step()
    before = rt.counters()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for _ in range(w.rounds):  # interleaved: other load on the host hits all three alike
        for name, (fn, args) in steps.items():
            times[name].append(time_steps(rt, fn, args, w.steps))
    after = rt.counters()
    t = {name: min(v)[0] for name, v in times.items()}  # best of: load from other processes only slows
    cpu = {name: min(c for _w, c in v) for name, v in times.items()}
    moco_ips, sup_ips = w.batch / t["moco"], w.batch / t["supervised"]
    # The MoCo step can at best cost a supervised step plus one no-grad forward: the measured
    # limit of the ratio (0.75 where a backward costs two forwards); efficiency = ratio / limit.
    limit = t["supervised"] / (t["supervised"] + t["key_forward"])
    graph = {k: after[k] - before[k] for k in after} if after else None
    out = {
        "backend": backend, "device": _device_name(rt), "precision": precision,
        "moco_images_per_s": moco_ips, "supervised_images_per_s": sup_ips, "ratio": moco_ips / sup_ips,
        "ratio_limit": limit, "efficiency": moco_ips / sup_ips / limit,
        "moco_step_s": t["moco"], "supervised_step_s": t["supervised"], "key_forward_s": t["key_forward"],
        "cpu_time_ratio": cpu["supervised"] / cpu["moco"],
        "cpu_time_ratio_limit": cpu["supervised"] / (cpu["supervised"] + cpu["key_forward"]),
        "measured_steps": w.steps * w.rounds,
        "compiles_after_warmup": graph["compiles"] if graph else None,
        "fallback_ops_after_warmup": graph["fallback_ops"] if graph else None,
        "transfers_after_warmup": graph["transfers_from_device"] if graph else None,
        "fallback_op_names": rt.fallback_ops() if graph else None,
        "peak_host_rss_bytes": peak_rss_bytes(),
        "peak_device_bytes": rt.memory_stats().get("peak_bytes"),
    }
    if backend == "xla":
        out["shuffle_hlo"] = shuffle_hlo_bytes(rt, moco, im_k, precision, w)
    return out


def shuffle_hlo_bytes(rt, moco: nn.Module, im_k: torch.Tensor, precision: str, w: Workload
                      ) -> list[dict[str, Any]]:
    """Bytes per replica per step read from the lowered graph of each shuffle mode's key path.

    One device lowers the per-replica program: an all-gather's operand is this replica's
    rows, so at N replicas it receives N - 1 times that; an all-to-all keeps 1/N at home.
    """
    from .profiling import collectives
    from .shuffle import shuffled_keys
    rows, earlier = [], Counter()
    for mode in ("gather", "all_to_all"):
        with torch.no_grad(), rt.autocast(precision):
            keys, _ = shuffled_keys(rt, copy.deepcopy(moco.encoder_k), im_k, mode)
        # torch_xla orders collectives through a token, so this graph also holds the earlier
        # mode's collectives: keep only the new ones (nothing is compiled or run here).
        found = [c for c in collectives(rt.graph_text([keys])) if c.op in ("all-gather", "all-to-all")]
        new, seen = [], earlier.copy()
        for c in found:
            key = (c.op, tuple(c.shapes))
            if seen[key]:
                seen[key] -= 1
            else:
                new.append(c)
        earlier.update((c.op, tuple(c.shapes)) for c in new)
        for world in _worlds(w.batch):
            rows.append({"mode": mode, "world": world, "ops": [c.op for c in new],
                         "hlo_bytes": sum(c.received_bytes(world) for c in new), "key_dtype": str(keys.dtype)})
    return rows


def _device_name(rt) -> str:
    if rt.device.type == "cuda":
        return torch.cuda.get_device_name(rt.device)
    if rt.name == "xla":
        return f"XLA:{os.environ.get('PJRT_DEVICE', 'TPU')}"
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------- the official code, side by side
#
# OfficialMoCo restates the MoCo builder of facebookresearch/moco (moco/builder.py, MIT licence,
# Copyright (c) Meta Platforms, Inc. and affiliates, https://github.com/facebookresearch/moco)
# operation for operation, and official_step the training step of its main_moco.py: the whole
# model under DistributedDataParallel with its defaults, nn.CrossEntropyLoss on the returned
# logits, SGD over model.parameters(). Only what it needs from torch.distributed comes through
# the Runtime (this package may not import it): all_gather (empty tensors, all_gather, cat, as
# its concat_all_gather), broadcast, the rank, and rt.ddp for the DDP wrapper. Precision: the
# official code has no AMP; here both sides run under the same autocast (and GradScaler for fp16).


@dataclass
class Comparison:
    """The side-by-side setting: the quickstart's digits model on 2 gloo processes (CPU), or
    ResNet-50 at 224 px on every GPU (CUDA); asymmetric MoCo v2, as the official code runs."""

    workload: Workload
    world: int = 2
    rounds: int = 9             # interleaved rounds (the order rotates); the median counts
    steps: int = 10             # steps per step kind per round


def comparison_for(backend: str, quick: bool, gpus: int = 1) -> Comparison:
    """Digits model (small ResNet width 32, 1 x 16 x 16, Split BN 8, K 1024, batch 64 per process,
    1 thread each) on CPU; ResNet-50 224 px, batch 128 per GPU, K 65536, AMP on CUDA."""
    if quick:
        return Comparison(Workload(width=8, image_size=16, channels=1, batch=16, K=256, dim=16, bn_splits=2,
                                   warmup=1, threads=1), world=2 if backend == "cpu" else max(gpus, 1),
                          rounds=2, steps=2)
    if backend == "cuda":
        return Comparison(Workload(arch="resnet50", image_size=224, small_stem=False, batch=128, classes=1000,
                                   K=65536, bn_splits=1, warmup=10), world=max(gpus, 1), rounds=5, steps=20)
    return Comparison(Workload(width=32, image_size=16, channels=1, batch=64, K=1024, dim=128, bn_splits=8,
                               warmup=3, threads=1), world=2)


class OfficialMoCo(nn.Module):
    """facebookresearch/moco's MoCo builder (query and key encoder, queue), restated for the bench."""

    def __init__(self, rt, encoder_q: nn.Module, encoder_k: nn.Module, dim: int, K: int, m: float,
                 T: float) -> None:
        super().__init__()
        self.rt, self.K, self.m, self.T = rt, K, m, T
        self.encoder_q, self.encoder_k = encoder_q, encoder_k
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)  # initialise the key encoder from the query encoder
            param_k.requires_grad = False     # updated by momentum only
        self.register_buffer("queue", torch.randn(dim, K))
        self.queue = F.normalize(self.queue, dim=0)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.mul_(self.m).add_(param_q.mul(1.0 - self.m))  # one pair of tensors at a time

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        keys = self.rt.all_gather(keys)
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)  # a host read of the pointer every step
        assert self.K % batch_size == 0
        self.queue[:, ptr:ptr + batch_size] = keys.T
        self.queue_ptr[0] = (ptr + batch_size) % self.K

    @torch.no_grad()
    def _batch_shuffle_ddp(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size_this = x.shape[0]
        x_gather = self.rt.all_gather(x)
        num_replicas = x_gather.shape[0] // batch_size_this
        idx_shuffle = self.rt.broadcast(torch.randperm(x_gather.shape[0], device=x.device), src=0)
        idx_unshuffle = torch.argsort(idx_shuffle)
        idx_this = idx_shuffle.view(num_replicas, -1)[self.rt.rank]
        return x_gather[idx_this], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle_ddp(self, x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
        batch_size_this = x.shape[0]
        x_gather = self.rt.all_gather(x)
        num_replicas = x_gather.shape[0] // batch_size_this
        return x_gather[idx_unshuffle.view(num_replicas, -1)[self.rt.rank]]

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            im_k, idx_unshuffle = self._batch_shuffle_ddp(im_k)
            k = F.normalize(self.encoder_k(im_k), dim=1)
            k = self._batch_unshuffle_ddp(k, idx_unshuffle)
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])
        logits = torch.cat([l_pos, l_neg], dim=1)
        logits /= self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(k)
        return logits, labels


def _model_config(w: Workload):
    from .config import ModelConfig
    return ModelConfig(arch=w.arch, in_channels=w.channels, small_stem=w.small_stem, width=w.width,
                       dim=w.dim, mlp=True, bn_splits=w.bn_splits)


def official_step(rt, w: Workload, precision: str) -> Callable[..., torch.Tensor]:
    """main_moco.py's step: DDP(OfficialMoCo), cross-entropy, zero_grad, backward, SGD step."""
    from .models import build_encoder
    torch.manual_seed(0)
    mcfg = _model_config(w)
    model = OfficialMoCo(rt, build_encoder(mcfg, rt), build_encoder(mcfg, rt), w.dim, w.K, 0.99, 0.1)
    model = rt.ddp(model.to(rt.device))
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), 0.03, momentum=0.9, weight_decay=1e-4)
    scaler = rt.grad_scaler(precision)

    def step(im_q: torch.Tensor, im_k: torch.Tensor) -> torch.Tensor:
        with rt.autocast(precision):
            output, target = model(im_q=im_q, im_k=im_k)
            loss = criterion(output, target)
        optimizer.zero_grad()
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return loss.detach()
    step.model = model  # type: ignore[attr-defined]
    return step


def moco_xla_step(rt, w: Workload, precision: str, overlap: bool = True) -> Callable[..., torch.Tensor]:
    """moco_xla's step on the same encoder and settings (MoCo from moco.py, Runtime.backward_step)."""
    from .models import build_encoder, to_channels_last
    from .moco import MoCo
    torch.manual_seed(0)
    mcfg = _model_config(w)
    model = MoCo(build_encoder(mcfg, rt), rt, w.dim, w.K, 0.99, 0.1, symmetric=False,
                 shuffle="gather").to(rt.device).train()
    to_channels_last(model, mcfg, rt.device)  # moco_xla's default: on for CUDA, off on CPU
    rt.sync_module(model)
    return make_step(rt, model, model.encoder_q.parameters(), precision, moco=True, overlap=overlap)


def compare_in_replica(rt, c: Comparison) -> dict[str, Any]:
    """Run inside each replica: both steps, timed in interleaved rounds (every replica in step)."""
    w = c.workload
    precision = rt.resolve_precision(w.precision)
    shape = (w.batch, w.channels, w.image_size, w.image_size)
    g = torch.Generator().manual_seed(rt.rank)
    x = torch.randn(shape, generator=g)
    args = (x.to(rt.device), (x + 0.1 * torch.randn(shape, generator=g)).to(rt.device))
    steps = {"moco_xla": moco_xla_step(rt, w, precision), "official": official_step(rt, w, precision),
             "moco_xla_flat": moco_xla_step(rt, w, precision, overlap=False)}
    for _ in range(w.warmup):
        for fn in steps.values():
            fn(*args)
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(c.rounds):  # rotate which step goes first: drift and load hit all alike
        for name in names[r % 3:] + names[:r % 3]:
            rt.barrier()
            wall, cpu_s = time_steps(rt, steps[name], args, c.steps)
            times[name].append(wall)
            cpu[name].append(cpu_s)
    med = {name: _median(v) for name, v in times.items()}
    rounds = [o / m for o, m in zip(times["official"], times["moco_xla"])]
    return {"backend": rt.name, "device": _device_name(rt), "precision": precision, "world": rt.world_size,
            "moco_xla_step_s": med["moco_xla"], "official_step_s": med["official"],
            "moco_xla_images_per_s_per_replica": w.batch / med["moco_xla"],
            "official_images_per_s_per_replica": w.batch / med["official"],
            "ratio": med["official"] / med["moco_xla"], "median_round_ratio": _median(rounds),
            "round_ratios": rounds, "round_step_s": times,
            "cpu_time_ratio": _median(cpu["official"]) / _median(cpu["moco_xla"]),
            "flat_step_s": med["moco_xla_flat"], "overlap_over_flat": med["moco_xla_flat"] / med["moco_xla"],
            "round_cpu_s": cpu, "rounds": c.rounds, "steps_per_round": c.steps}


def _median(v: list[float]) -> float:
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def _compare_child(rank: int, world: int, port: int, backend: str, c: Comparison, result_path: str) -> None:
    from .runtime import make_runtime
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if c.workload.threads:
        torch.set_num_threads(c.workload.threads)
    rt = make_runtime(backend, rank, world, rank)
    try:
        result = compare_in_replica(rt, c)
        if rank == 0:
            Path(result_path).write_text(json.dumps(result))
    finally:
        rt.shutdown()


def run_comparison(backend: str, c: Comparison) -> dict[str, Any]:
    """Both steps in ``c.world`` fresh processes (gloo on CPU, NCCL on GPUs); rank 0's figures."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "compare.json"
        ctx = mp.get_context("spawn")
        from .runtime.replicas import free_port
        port = free_port()
        procs = [ctx.Process(target=_compare_child, args=(r, c.world, port, backend, c, str(path)))
                 for r in range(c.world)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        if not path.is_file():
            codes = [proc.exitcode for proc in procs]
            return {"backend": backend, "error": f"side-by-side processes exited with codes {codes}"}
        return json.loads(path.read_text())


# ----------------------------------------------------------------------------- parts without a device

def shuffle_count_bytes(w: Workload, precision: str) -> list[dict[str, Any]]:
    """Shuffle bytes per replica per step counted from the shapes (shuffle.bytes_per_step)."""
    from .shuffle import bytes_per_step
    key_bytes = 2 if precision in ("bf16", "fp16") else 4
    numel = w.channels * w.image_size * w.image_size
    return [{"mode": mode, "world": n, "count_bytes": bytes_per_step(mode, n, w.batch, numel, w.dim, 4, key_bytes)}
            for mode in ("gather", "all_to_all") for n in _worlds(w.batch)]


def _worlds(batch: int) -> list[int]:
    """Replica counts to report: all_to_all needs the per-replica batch divisible by them."""
    return [n for n in SHUFFLE_WORLDS if batch % n == 0] or [2]


def loader_rows(quick: bool, which: str = "auto") -> list[dict[str, Any]]:
    """Input pipeline images/s: benchmarks/loader_bench.py's ``run(quick)`` (auto, where present:
    folder vs local vs GCS-emulator shards, minutes), else the digits pre-training loader (the
    quickstart's two-view augmentation, seconds)."""
    path = ROOT / "benchmarks" / "loader_bench.py"
    if which == "off":
        return []
    if which == "auto" and path.is_file():
        spec = importlib.util.spec_from_file_location("moco_xla_loader_bench", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        return [dict(r, suite="benchmarks/loader_bench.py") for r in mod.run(quick)]
    return [digits_loader_row(16 if quick else 64, 4 if quick else 20)]


def digits_loader_row(batch: int, batches: int) -> dict[str, Any]:
    from . import data
    from .config import load_config
    cfg = load_config("tiny")
    bundle = data.build(cfg)
    loader = data.pretrain_loader(bundle.pretrain, batch, 0, 1, 0, 0, batches)
    t0 = time.perf_counter()
    n = sum(q.shape[0] for q, _k in loader)
    return {"source": "digits (in memory)", "workers": 0, "images_per_s": n / (time.perf_counter() - t0),
            "suite": "moco_xla.bench"}


def _child(backend: str, w: Workload, result_path: str) -> None:
    try:
        if backend == "xla" and not _tpu_attached():
            os.environ.setdefault("PJRT_DEVICE", "CPU")
            os.environ.setdefault("XLA_ALWAYS_ALLREDUCE", "1")  # compile the collectives a TPU runs
        result = bench_backend(backend, w)
    except Exception as e:  # reported in the table, not raised: other backends still run
        result = {"backend": backend, "error": f"{type(e).__name__}: {e}"}
    Path(result_path).write_text(json.dumps(result))


def _tpu_attached() -> bool:
    from .runtime import tpu_available
    return os.environ.get("PJRT_DEVICE", "").upper() != "CPU" and tpu_available()


def run_in_child(backend: str, w: Workload) -> dict[str, Any]:
    """Each backend in a fresh process: its own peak RSS, no torch_xla state in the others."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "result.json"
        proc = mp.get_context("spawn").Process(target=_child, args=(backend, w, str(path)))
        proc.start()
        proc.join()
        if not path.is_file():
            return {"backend": backend, "error": f"benchmark process exited with code {proc.exitcode}"}
        return json.loads(path.read_text())


# ----------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moco_xla.bench", description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="auto",
                   help="comma-separated: cpu, xla, cuda, auto (default auto: TPU, else CUDA, else CPU)")
    p.add_argument("--quick", action="store_true", help="tiny model, a few steps (seconds; for tests)")
    p.add_argument("--out", default="bench", help="directory for bench.json (default: ./bench)")
    p.add_argument("--arch", default=None, help="override the encoder (resnet18/34/50, small_resnet)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="per-replica batch")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round")
    p.add_argument("--precision", default=None, help="auto | fp32 | bf16 | fp16")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: one per core; 1 is steadier on a busy host)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds; the best counts")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the encoders (train.compile; cpu and cuda; warm-up then includes compiling)")
    p.add_argument("--official", default="auto", choices=("auto", "on", "off"),
                   help="side by side with the official facebookresearch/moco builder under DDP on cpu "
                        "(2 gloo processes) and cuda (every GPU); auto = on unless --quick")
    p.add_argument("--official-rounds", type=int, default=None, help="interleaved rounds of the side by side")
    p.add_argument("--loader", default="auto", choices=("auto", "digits", "off"),
                   help="input pipeline rows: auto = benchmarks/loader_bench.py where present (minutes), "
                        "digits = the in-memory quickstart loader (seconds)")
    return p.parse_args(argv)


def resolve_backends(spec: str) -> list[str]:
    from .runtime import available_replicas, resolve_backend, xla_installed
    names = [b.strip() for b in spec.split(",") if b.strip()]
    valid = ("auto", "cpu", "xla", "cuda")
    for b in names:
        if b not in valid:
            raise UserError(f"--backend {b!r}; valid: {', '.join(valid)} (comma-separated)")
    out = []
    for b in names:
        b = resolve_backend(b)
        if b == "xla" and not xla_installed():
            raise UserError("--backend xla needs torch_xla (pip install torch_xla)")
        if b == "cuda" and available_replicas("cuda") == 0:
            raise UserError("--backend cuda found no CUDA GPU; valid here: cpu" +
                            (", xla" if xla_installed() else ""))
        if b not in out:
            out.append(b)
    return out or ["cpu"]


def apply_overrides(w: Workload, args: argparse.Namespace) -> Workload:
    from .models import ARCHS
    if args.arch is not None and args.arch not in ARCHS:
        raise UserError(f"--arch {args.arch!r}; valid: {', '.join(ARCHS)}")
    for flag, value, low in (("--image-size", args.image_size, 8), ("--batch", args.batch, 2),
                             ("--steps", args.steps, 1), ("--threads", args.threads, 1),
                             ("--rounds", args.rounds, 1)):
        if value is not None and value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    if args.precision is not None and args.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"--precision {args.precision!r}; valid: auto, fp32, bf16, fp16")
    changes = {"arch": args.arch, "image_size": args.image_size, "batch": args.batch, "steps": args.steps,
               "precision": args.precision, "threads": args.threads, "rounds": args.rounds,
               "compile": args.compile or None}
    w = dataclasses.replace(w, **{k: v for k, v in changes.items() if v is not None})
    if w.K % w.batch:
        w = dataclasses.replace(w, K=max(w.batch, w.K // w.batch * w.batch))
    if w.batch % w.bn_splits:
        w = dataclasses.replace(w, bn_splits=1)
    return w


def run(args: argparse.Namespace) -> dict[str, Any]:
    from .runtime import available_replicas, resolve_precision
    backends = resolve_backends(args.backend)
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick, "backends": {}, "workloads": {}}
    for b in backends:
        w = apply_overrides(workload_for(b, args.quick), args)
        resolve_precision(b, w.precision)  # UserError for e.g. fp16 on XLA, before a process starts
        if w.compile and b == "xla":
            raise UserError("--compile is for the cpu and cuda backends (XLA compiles the step graph itself)")
        results["workloads"][b] = dataclasses.asdict(w)
        print(f"bench: {b} ({w.arch}, {w.image_size} px, batch {w.batch}) ...", flush=True)
        results["backends"][b] = run_in_child(b, w)
    if args.official_rounds is not None and args.official_rounds < 1:
        raise UserError(f"--official-rounds must be >= 1, got {args.official_rounds}")
    results["official"] = {}
    if args.official == "on" or (args.official == "auto" and not args.quick):
        for b in backends:
            if b in ("cpu", "cuda"):
                c = comparison_for(b, args.quick, available_replicas("cuda") if b == "cuda" else 0)
                if args.official_rounds:
                    c = dataclasses.replace(c, rounds=args.official_rounds)
                results["workloads"][f"official-{b}"] = {**dataclasses.asdict(c.workload), "world": c.world}
                print(f"bench: {b} side by side with the official code ({c.world} processes) ...", flush=True)
                results["official"][b] = run_comparison(b, c)
    ref = "xla" if "xla" in backends else backends[0]  # the shuffle counts match its lowered graph
    w0 = Workload(**results["workloads"][ref])
    prec = results["backends"][ref].get("precision", "fp32")
    results["loader"] = loader_rows(args.quick, args.loader)
    results["shuffle"] = merge_shuffle(shuffle_count_bytes(w0, prec),
                                       results["backends"].get("xla", {}).get("shuffle_hlo", []))
    loader_ips = max((r.get("images_per_s") or 0 for r in results["loader"]), default=0)
    for r in results["backends"].values():
        if "moco_images_per_s" in r:
            r["loader_over_step"] = loader_ips / r["moco_images_per_s"]
    return results


def merge_shuffle(count: list[dict], hlo: list[dict]) -> list[dict]:
    by_key = {(r["mode"], r["world"]): r for r in hlo}
    return [{**r, **{k: v for k, v in by_key.get((r["mode"], r["world"]), {}).items()
                     if k in ("hlo_bytes", "ops", "key_dtype")}} for r in count]


def machine() -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__}
    if importlib.util.find_spec("torch_xla") is not None:
        from importlib.metadata import version
        info["torch_xla"] = version("torch_xla")
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def table(results: dict[str, Any]) -> str:
    """The printed summary: one block per backend, then the shuffle bytes."""
    lines = []
    for b, r in results["backends"].items():
        if "error" in r:
            lines.append(f"{b:<5} failed: {r['error']}")
            continue
        w = results["workloads"][b]
        lines.append(f"{b:<5} {r['device']}  {w['arch']} {w['image_size']} px  batch {w['batch']}  {r['precision']}")
        lines.append(f"      MoCo {r['moco_images_per_s']:.1f} img/s  supervised {r['supervised_images_per_s']:.1f} "
                     f"img/s  ratio {r['ratio']:.3f} (goal >= 0.70; measured limit {r['ratio_limit']:.3f}, "
                     f"efficiency {r['efficiency']:.2f})")
        if b != "cuda":
            lines.append(f"      by this process's CPU time: ratio {r['cpu_time_ratio']:.3f}, "
                         f"limit {r['cpu_time_ratio_limit']:.3f}")
        if r["compiles_after_warmup"] is not None:
            lines.append(f"      after warm-up: {r['compiles_after_warmup']} compilations, "
                         f"{r['fallback_ops_after_warmup']} fallback ops, {r['transfers_after_warmup']} host reads")
        dev = r.get("peak_device_bytes")
        lines.append(f"      peak host RSS {r['peak_host_rss_bytes'] / 2**20:.0f} MiB"
                     + (f", device {dev / 2**20:.0f} MiB" if dev else "")
                     + f"; loader/step images/s {r.get('loader_over_step', 0):.2f}")
    for b, r in results.get("official", {}).items():
        lines.append(official_line(b, r, results["workloads"].get(f"official-{b}", {})))
    for r in results["loader"]:
        lines.append(f"loader {r.get('source', '?')}, {r.get('workers', '?')} workers: "
                     f"{r.get('images_per_s', 0):.0f} img/s")
    for r in results["shuffle"]:
        hlo = f"  (HLO {r['hlo_bytes'] / 2**20:.2f} MiB)" if "hlo_bytes" in r else ""
        lines.append(f"shuffle {r['mode']:<10} x{r['world']:<3} {r['count_bytes'] / 2**20:8.2f} MiB/step/replica{hlo}")
    return "\n".join(lines)


def official_line(backend: str, r: dict[str, Any], w: dict[str, Any]) -> str:
    """The side-by-side row: moco_xla against the official builder under DDP, as a speed ratio."""
    if "error" in r:
        return f"{backend:<5} side by side failed: {r['error']}"
    return (f"{backend:<5} vs official facebookresearch/moco under DDP ({r['world']} x {r['device']}, "
            f"{w.get('arch')} {w.get('image_size')} px, batch {w.get('batch')}/replica, {r['precision']}): "
            f"moco_xla {r['moco_xla_images_per_s_per_replica']:.1f} img/s/replica, official "
            f"{r['official_images_per_s_per_replica']:.1f}: ratio {r['ratio']:.3f} (goal >= 1.10; median of "
            f"{r['rounds']} interleaved rounds; by CPU time {r['cpu_time_ratio']:.3f}); overlapped all-reduce "
            f"{r['overlap_over_flat']:.3f}x the flat one after backward")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; pass a directory")
        results = run(args)
    except RunStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"bench.json in {out}")
    failed = [r for part in ("backends", "official") for r in results[part].values() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
