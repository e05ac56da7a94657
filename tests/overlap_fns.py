"""Run inside gloo worker processes: overlapped gradient averaging against the flat all_reduce."""
from __future__ import annotations

import copy

import torch


def _grads(params) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in params]


def overlapped_vs_flat(rt, cfg, steps: int, bucket_bytes: int):
    """Each step twice from the same state and RNG: the flat reference (``loss.backward`` then
    ``Runtime.reduce_gradients``) and ``rt.backward_step`` (bucketed, overlapping backward).

    Returns both gradient lists per step (the overlapped ones read in an optimizer pre-step
    hook, right before SGD uses them), the bucket report and both encoders at the end.
    """
    from moco_xla.train import build_model, build_optimizer, compile_encoders
    rt.first_bucket_bytes = rt.bucket_bytes = bucket_bytes  # several buckets even for the tiny model
    cfg.train.seed = rt.rank  # different init everywhere: the start broadcast must fix it
    model = build_model(cfg, rt)
    opt = build_optimizer(cfg, model)
    compile_encoders(cfg, rt, model)  # train.compile: the hooks then follow a compiled backward
    params = list(model.encoder_q.parameters())
    seen: list[list[torch.Tensor]] = []
    nhwc: list[int] = []  # gradients in channels-last layout, as SGD gets them

    def before_step(*_) -> None:
        seen.append(_grads(params))
        nhwc.append(sum(not p.grad.is_contiguous() for p in params))
    opt.register_step_pre_hook(before_step)
    per = cfg.train.batch_size // rt.world_size
    g = torch.Generator().manual_seed(rt.rank)
    flat, reports = [], []
    for _ in range(steps):
        im_q = torch.randn(per, 1, 16, 16, generator=g)
        im_k = im_q + 0.1 * torch.randn(per, 1, 16, 16, generator=g)
        state, rng = copy.deepcopy(model.state_dict()), torch.get_rng_state()
        loss, _ = model(im_q, im_k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        rt.reduce_gradients(opt)  # the one-flattened-all_reduce reference
        flat.append(_grads(params))
        model.load_state_dict(state)
        torch.set_rng_state(rng)  # the same shuffle permutation again
        loss, _ = model(im_q, im_k)
        opt.zero_grad(set_to_none=True)
        rt.backward_step(loss, opt)
        reports.append(rt.gradient_buckets(opt).report())
    return {"flat": flat, "overlapped": seen, "reports": reports, "nhwc_grads": nhwc,
            "q": [p.detach().clone() for p in model.encoder_q.parameters()],
            "k": [p.detach().clone() for p in model.encoder_k.parameters()],
            "queue": model.queue.clone()}


def official_matches_moco_xla(rt, steps: int):
    """One replica, plain BN (batch statistics then do not depend on the key shuffle's order):
    the bench's restated official step and moco_xla's step train the same weights and queue."""
    import dataclasses

    from moco_xla import bench
    w = dataclasses.replace(bench.comparison_for("cpu", quick=True).workload, bn_splits=1)
    ours, official = bench.moco_xla_step(rt, w, "fp32"), bench.official_step(rt, w, "fp32")
    mine, ref = ours.model, official.model.module
    ref.encoder_q.load_state_dict(mine.encoder_q.state_dict())
    ref.encoder_k.load_state_dict(mine.encoder_k.state_dict())
    ref.queue.copy_(mine.queue)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        im_q = torch.randn(w.batch, w.channels, w.image_size, w.image_size, generator=g)
        im_k = im_q + 0.1 * torch.randn(im_q.shape, generator=g)
        losses.append(torch.stack([ours(im_q, im_k), official(im_q, im_k)]))
    return {"losses": losses,
            "q": [(a.detach().clone(), b.detach().clone())
                  for a, b in zip(mine.encoder_q.parameters(), ref.encoder_q.parameters())],
            "queue": (mine.queue.clone(), ref.queue.clone()), "ptr": (mine.queue_ptr, ref.queue_ptr)}
