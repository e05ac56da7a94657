"""One MoCo v2 training step on a replica's slice of a global batch: run inside gloo workers and, for the
one-process reference, in the test process (test_replica_equivalence.py)."""
from __future__ import annotations

import torch

PERMUTATION_SEED = 7  # every process draws the shuffle permutation from this state (rank 0's is broadcast)


def global_views(n: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views of ``n`` 16 px images; per-sample offsets make every BN group's statistics differ."""
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, 1, 16, 16, generator=g) + torch.linspace(-1, 1, n).view(-1, 1, 1, 1)
    x2 = x1 + 0.3 * torch.randn(n, 1, 16, 16, generator=g)
    return x1, x2


def v2_step(rt, per: int, bn_splits: int) -> dict:
    """The training path of train.py for one step: forward (shuffle BN, Split BN, queue), averaged
    gradients and the optimizer step, on this replica's ``per`` images of the global batch."""
    from moco_xla.config import load_config
    from moco_xla.train import build_model, build_optimizer
    cfg = load_config("tiny", [f"train.batch_size={per * rt.world_size}", f"model.bn_splits={bn_splits}"])
    cfg.train.seed = rt.rank  # a different init on every replica: build_model's broadcast must fix it
    model = build_model(cfg, rt)
    opt = build_optimizer(cfg, model)
    x1, x2 = global_views(per * rt.world_size)
    x1, x2 = x1[rt.rank * per:(rt.rank + 1) * per], x2[rt.rank * per:(rt.rank + 1) * per]
    torch.manual_seed(PERMUTATION_SEED)
    loss, stats = model(x1, x2)
    opt.zero_grad()
    rt.backward_step(loss, opt)
    buffers = dict(model.encoder_q.named_buffers())
    return {"loss": loss.detach(), "queue": model.queue.clone(), "ptr": model.queue_ptr.clone(),
            "grads": {n: p.grad.clone() for n, p in model.encoder_q.named_parameters()},
            "weights": {n: p.detach().clone() for n, p in model.encoder_q.named_parameters()},
            "running": {n: b.clone() for n, b in buffers.items() if "running_" in n}}
