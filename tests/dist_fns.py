"""Functions run inside gloo worker processes (importable by the spawned interpreters)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from moco_xla.shuffle import shared_permutation, shuffled_keys


def tiny_encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))


def global_batch(world: int, per: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # distinct per-replica offsets make batch statistics differ between replicas
    x = torch.randn(world * per, 3, 6, 6, generator=g)
    return x + torch.arange(world).repeat_interleave(per).view(-1, 1, 1, 1).float()


def keys_with_shuffle(rt, mode: str, per: int):
    enc = tiny_encoder()
    x = global_batch(rt.world_size, per)[rt.rank * per:(rt.rank + 1) * per]
    torch.manual_seed(100 + rt.rank)  # replicas draw different random numbers on purpose
    with torch.no_grad():
        keys, perm = shuffled_keys(rt, enc, x, mode)
    plain = enc(x).detach()
    return {"keys": keys, "perm": perm, "plain": plain}


def identity_roundtrip(rt, mode: str, per: int):
    x = global_batch(rt.world_size, per)[rt.rank * per:(rt.rank + 1) * per]
    torch.manual_seed(7 + rt.rank)
    keys, _ = shuffled_keys(rt, lambda t: t * 1.0, x, mode)
    return {"x": x, "back": keys}


def broadcasts(rt, src: int):
    t = torch.arange(6, dtype=torch.float32) * (rt.rank + 1)
    native = t.clone()
    dist.broadcast(native, src=src)
    return {"via_all_reduce": rt.broadcast_by_all_reduce(t, src), "native": native,
            "iface": rt.broadcast(t, src), "perm": shared_permutation(rt, 16, torch.device("cpu"))}


def collectives(rt):
    t = torch.full((2, 3), float(rt.rank))
    return {"gather": rt.all_gather(t), "sum": rt.all_reduce(t, "sum"), "mean": rt.all_reduce(t, "mean"),
            "a2a": rt.all_to_all(torch.arange(rt.world_size * 2).float() + 100 * rt.rank)}


def assert_collectives(results: list[dict]) -> None:
    """What ``collectives`` (or its XLA twin in xla_fns) must return on every rank, any backend."""
    world = len(results)
    gather = torch.cat([torch.full((2, 3), float(r)) for r in range(world)])
    total = float(sum(range(world)))
    for rank, r in enumerate(results):
        assert torch.equal(r["gather"], gather)
        assert torch.equal(r["sum"], torch.full((2, 3), total))
        assert torch.equal(r["mean"], torch.full((2, 3), total / world))
        # all_to_all: replica `rank` receives chunk `rank` from every replica, in rank order
        want = torch.cat([torch.arange(rank * 2, rank * 2 + 2).float() + 100 * i for i in range(world)])
        assert torch.equal(r["a2a"], want)


def train_steps(rt, cfg, steps: int):
    """A few MoCo steps on different data per replica; returns both encoders' parameters."""
    from moco_xla.train import build_model, build_optimizer
    torch.manual_seed(1234 + rt.rank)  # would give different weights without the start broadcast
    cfg.train.seed = rt.rank  # build_model seeds with this: different init on every replica
    model = build_model(cfg, rt)
    opt = build_optimizer(cfg, model)
    per = cfg.train.batch_size // rt.world_size
    g = torch.Generator().manual_seed(rt.rank)
    for _ in range(steps):
        im_q = torch.randn(per, 1, 16, 16, generator=g)
        im_k = im_q + 0.1 * torch.randn(per, 1, 16, 16, generator=g)
        loss, _ = model(im_q, im_k)
        opt.zero_grad()
        loss.backward()
        rt.optimizer_step(opt)
    return {"q": [p.detach().clone() for p in model.encoder_q.parameters()],
            "k": [p.detach().clone() for p in model.encoder_k.parameters()],
            "queue": model.queue.clone(), "ptr": model.queue_ptr.clone()}


def scaled_steps(rt, steps: int = 3, bad_step: int = 1):
    """SGD steps through Runtime.backward_step without and with a GradScaler (the CUDA fp16 path).

    With the scaler, replica 1 meets an inf in its input at ``bad_step``: the step must be
    skipped on every replica, or the replicas' weights part ways.
    """
    out = {}
    for use_scaler in (False, True):
        torch.manual_seed(0)
        net = nn.Linear(4, 2)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if use_scaler else None
        g = torch.Generator().manual_seed(rt.rank)
        params = []
        for step in range(steps):
            x = torch.randn(8, 4, generator=g)
            if use_scaler and step == bad_step and rt.rank == 1:
                x[0, 0] = float("inf")
            loss = net(x).pow(2).mean()
            opt.zero_grad()
            rt.backward_step(loss, opt, scaler)
            params.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
        out["scaled" if use_scaler else "plain"] = params
        if scaler is not None:
            out["scale"] = scaler.get_scale()
    return out
