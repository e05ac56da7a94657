"""The step workloads and their timing, each backend in a fresh process.

``bench_backend`` runs inside one backend's process: MoCo's step, a supervised step on
the same encoder and the key encoder's forward alone, timed in interleaved rounds (wall
and this process's CPU time), plus XLA's compile/fallback counters and, on XLA, the
shuffle bytes read from the lowered graph. ``run_in_child`` gives each backend its own
process (its own peak RSS, no torch_xla state in the others).
"""
from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
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
    from ..models import build_encoder, to_channels_last
    from ..moco import MoCo

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
    from ..optim import prime_momentum
    from ..runtime import Runtime
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
    from ..profiling import peak_rss_bytes
    from ..runtime import make_runtime

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
    from ..profiling import collectives
    from ..shuffle import shuffled_keys
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



def _model_config(w: Workload):
    from ..config import ModelConfig
    return ModelConfig(arch=w.arch, in_channels=w.channels, small_stem=w.small_stem, width=w.width,
                       dim=w.dim, mlp=True, bn_splits=w.bn_splits)



def shuffle_count_bytes(w: Workload, precision: str) -> list[dict[str, Any]]:
    """Shuffle bytes per replica per step counted from the shapes (shuffle.bytes_per_step)."""
    from ..shuffle import bytes_per_step
    key_bytes = 2 if precision in ("bf16", "fp16") else 4
    numel = w.channels * w.image_size * w.image_size
    return [{"mode": mode, "world": n, "count_bytes": bytes_per_step(mode, n, w.batch, numel, w.dim, 4, key_bytes)}
            for mode in ("gather", "all_to_all") for n in _worlds(w.batch)]


def _worlds(batch: int) -> list[int]:
    """Replica counts to report: all_to_all needs the per-replica batch divisible by them."""
    return [n for n in SHUFFLE_WORLDS if batch % n == 0] or [2]



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
    from ..runtime import tpu_available
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

