"""MoCo v3 functions run inside gloo worker processes and, for the reference, in the test process."""
from __future__ import annotations

import torch

# A tiny MoCo v3: small ResNet (width 4) with the Runtime's SyncBN, 2-layer heads of width 32.
TINY = ["model.width=4", "model.dim=8", "moco.mlp_dim=32", "train.batch_size=16", "model.sync_bn=true",
        "model.bn_splits=1"]


def global_views(n: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views of ``n`` 16 px images; per-sample offsets make BN statistics differ between slices."""
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, 1, 16, 16, generator=g) + torch.linspace(-1, 1, n).view(-1, 1, 1, 1)
    x2 = x1 + 0.3 * torch.randn(n, 1, 16, 16, generator=g)
    return x1, x2


def v3_step(rt, per: int, sets: list[str]) -> dict:
    """One v3 forward/backward on this replica's slice of the global batch; what the test compares."""
    from moco_xla.config import load_config
    from moco_xla.train import build_model, build_optimizer
    cfg = load_config("mocov3_digits", sets)
    cfg.train.seed = rt.rank  # a different init on every replica: build_model's broadcast must fix it
    model = build_model(cfg, rt)
    opt = build_optimizer(cfg, model)
    model.set_momentum(0.9)
    x1, x2 = global_views(per * rt.world_size)
    x1, x2 = x1[rt.rank * per:(rt.rank + 1) * per], x2[rt.rank * per:(rt.rank + 1) * per]
    loss, stats = model(x1, x2)
    with torch.no_grad():  # the same keys and logits again (train-mode BN: batch statistics)
        k1, k2 = model.key(x1), model.key(x2)
        logits, labels = model.logits(model.query(x1), k2)
    opt.zero_grad()
    rt.backward_step(loss, opt)  # the training path: averaged gradients (buckets on gloo), then the step
    return {"loss": loss.detach(), "acc": stats["acc"], "k1": k1, "k2": k2, "logits": logits, "labels": labels,
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            "key_grads": [p.grad for p in model.encoder_k.parameters()]}


def xla_v3_steps(rt, runs: list[tuple[str, list[str]]], steps: int) -> dict:
    """On XLA replicas: ``steps`` v3 steps of each (config, overrides) with its per-step lr and momentum;
    compilations after every step, the lowered step's hash, the weights (CPU tensors)."""
    import hashlib
    from moco_xla.config import load_config
    from moco_xla.train import build_model, build_optimizer, step_schedule
    from xla_fns import collective_types, products
    out = {}
    for name, sets in runs:
        cfg = load_config(name, sets)
        model = build_model(cfg, rt)
        opt = build_optimizer(cfg, model)
        before = step_schedule(cfg, model, opt, steps_per_epoch=steps)
        per = cfg.train.batch_size // rt.world_size
        g = torch.Generator().manual_seed(rt.rank)  # each replica its own images, made on the host
        compiles, lrs, ms, graph = [], [], [], ""
        for step in range(steps):
            lrs.append(before(step))
            ms.append(model.m)
            x1 = torch.randn(per, 1, 16, 16, generator=g)
            x2 = x1 + 0.1 * torch.randn(per, 1, 16, 16, generator=g)
            loss, _ = model(x1.to(rt.device), x2.to(rt.device))
            opt.zero_grad(set_to_none=True)
            rt.backward_step(loss, opt)
            if step == steps - 1:
                graph = hashlib.sha256(rt.graph_text(list(model.parameters())).encode()).hexdigest()
                step_collectives = collective_types(rt, list(model.parameters()) + list(model.buffers()))
                step_products = products(rt, list(model.parameters()) + list(model.buffers()))
            rt.mark_step()
            compiles.append(rt.counters()["compiles"])
        out[name] = {"compiles": compiles, "lrs": lrs, "ms": ms, "graph": graph, "loss": loss.detach().cpu(),
                     "collectives": step_collectives, "products": step_products,
                     "q": [p.detach().cpu() for p in model.encoder_q.parameters()],
                     "k": [p.detach().cpu() for p in model.encoder_k.parameters()]}
    return out
