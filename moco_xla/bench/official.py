"""moco_xla's step side by side with facebookresearch/moco's, under DDP, on the same replicas."""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .steps import Workload, _device_name, _model_config, make_step, time_steps

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


def official_step(rt, w: Workload, precision: str) -> Callable[..., torch.Tensor]:
    """main_moco.py's step: DDP(OfficialMoCo), cross-entropy, zero_grad, backward, SGD step."""
    from ..models import build_encoder
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
    from ..models import build_encoder, to_channels_last
    from ..moco import MoCo
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


def _compare_body(backend: str, rank: int, world: int, local_rank: int, c: Comparison,
                  result_path: str) -> None:
    """One replica of the side by side (runtime.replicas' body): rank 0 writes the figures."""
    from ..runtime import make_runtime
    if c.workload.threads:
        torch.set_num_threads(c.workload.threads)
    rt = make_runtime(backend, rank, world, local_rank)
    try:
        result = compare_in_replica(rt, c)
        if rank == 0:
            Path(result_path).write_text(json.dumps(result))
    finally:
        rt.shutdown()


def run_comparison(backend: str, c: Comparison) -> dict[str, Any]:
    """Both steps on ``c.world`` replicas started by runtime.replicas (gloo processes on CPU,
    NCCL on GPUs); rank 0's figures, or an error row (other rows still run)."""
    from ..runtime import replicas
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "compare.json"
        try:
            replicas.start(backend, c.world, _compare_body, (c, str(path)))
        except Exception as e:  # noqa: BLE001 - reported in the table, not raised
            return {"backend": backend, "error": f"side-by-side replicas failed: {type(e).__name__}: {e}"}
        if not path.is_file():
            return {"backend": backend, "error": "side-by-side replicas wrote no result"}
        return json.loads(path.read_text())
