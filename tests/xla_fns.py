"""Functions run on N XLA:CPU replicas (tests/xla_replicas.py); each returns CPU tensors.

Per-replica inputs are made on the host and copied to the device: a rank-dependent Python
number inside a graph would give each replica a different graph (and XLA:CPU's in-process
collectives would wait for each other until the 10 s abort).
"""
from __future__ import annotations

import copy
import hashlib
import time

import torch
import torch.nn as nn

import dist_fns
from moco_xla.shuffle import shuffled_keys


def _cpu(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cpu(v) for v in x)
    return x


def collective_types(rt, tensors) -> list[str]:
    """The collectives of the graph that computes ``tensors``, e.g. ``all-reduce(s32[25], f32[])``."""
    from moco_xla.profiling import collectives as in_hlo
    return [f"{c.op}({', '.join(c.shapes)})" for c in in_hlo(rt.graph_text(list(tensors)))]


def products(rt, tensors) -> dict[str, list[str]]:
    """The graph's dots and convolutions by precision: ``highest`` (HLO operand_precision) or ``default``."""
    import re
    found: dict[str, list[str]] = {"highest": [], "default": []}
    for line in rt.graph_text(list(tensors)).splitlines():
        m = re.search(r"= (\w+\[[0-9,]*\])\S* (dot|convolution)\(", line)  # type without layout
        if m:
            found["highest" if "operand_precision={highest,highest}" in line else "default"].append(
                f"{m.group(2)} {m.group(1)}")
    return found


def collectives(rt) -> dict:
    """Broadcasts of 0-dim, int64 and float buffers; all_gather / all_reduce / all_to_all per rank."""
    dev, r = rt.device, rt.rank
    bn = nn.BatchNorm2d(4)
    bn.running_mean.copy_(torch.arange(4.0) + 10 * r)
    bn.num_batches_tracked.fill_(5 + r)  # 0-dim int64: the buffer that broke sync_module on XLA
    bn.weight.data.fill_(2.0 + r)
    bn.to(dev)
    rt.sync_module(bn)
    drift = nn.BatchNorm1d(3)
    drift.running_var.fill_(1.0 + r)
    drift.to(dev)
    rt.sync_batchnorm_stats(drift)
    t = (torch.full((2, 3), float(r)) + 0).to(dev)
    ints = (torch.arange(3, dtype=torch.int64) * (r + 2)).to(dev)
    return _cpu({
        "bn": {k: v for k, v in bn.state_dict().items()}, "bn_weight": bn.weight,
        "drift_var": drift.running_var,
        "bcast_int": rt.broadcast(ints, src=0), "bcast_0d": rt.broadcast(torch.tensor(7 + r).to(dev), src=0),
        "gather": rt.all_gather(t), "sum": rt.all_reduce(t, "sum"), "mean": rt.all_reduce(t, "mean"),
        "a2a": rt.all_to_all((torch.arange(rt.world_size * 2).float() + 100 * r).to(dev)),
    })


def shuffle_keys(rt, per: int) -> dict:
    """Keys with shuffle BN in both modes, and the round trip of the images themselves."""
    rt.manual_seed(0)
    with rt.cpu_rng():  # replica threads share torch's CPU generator: draw under the replica's own
        enc = dist_fns.tiny_encoder().to(rt.device)
    x = dist_fns.global_batch(rt.world_size, per)[rt.rank * per:(rt.rank + 1) * per].to(rt.device)
    out = {"x": x}
    with torch.no_grad():
        for mode in ("gather", "all_to_all"):
            keys, perm = shuffled_keys(rt, enc, x, mode)
            back, _ = shuffled_keys(rt, lambda t: t * 1.0, x, mode)
            out[mode] = {"keys": keys, "perm": perm, "back": back}
        out["plain"] = enc(x)
    return _cpu(out)


def train_steps(rt, cfg, steps: int) -> dict:
    """MoCo steps on different data per replica; parameters, queue, compilations, graph hash."""
    from moco_xla.train import build_model, build_optimizer
    cfg = copy.deepcopy(cfg)
    cfg.train.seed = rt.rank  # a different init on every replica: the start broadcast must fix it
    model = build_model(cfg, rt)
    startup = collective_types(rt, list(model.parameters()) + list(model.buffers()))  # sync_module, not run yet
    opt = build_optimizer(cfg, model)
    per = cfg.train.batch_size // rt.world_size
    g = torch.Generator().manual_seed(rt.rank)
    compiles, graph, step_collectives, step_products = [], "", [], {}
    for step in range(steps):
        im_q = torch.randn(per, 1, 16, 16, generator=g)
        im_k = im_q + 0.1 * torch.randn(per, 1, 16, 16, generator=g)
        with rt.autocast(cfg.train.precision):  # auto: bf16, as on a TPU
            loss, _ = model(im_q.to(rt.device), im_k.to(rt.device))
        opt.zero_grad()
        loss.backward()
        rt.optimizer_step(opt)
        if step == steps - 1:  # the whole lowered step (forward, backward, collectives, update)
            graph = hashlib.sha256(rt.graph_text(list(model.parameters()) + [model.queue]).encode()).hexdigest()
            step_collectives = collective_types(rt, list(model.parameters()) + list(model.buffers()))
            step_products = products(rt, list(model.parameters()) + list(model.buffers()))
        rt.mark_step()
        compiles.append(rt.counters()["compiles"])
    return _cpu({"q": [p for p in model.encoder_q.parameters()], "k": [p for p in model.encoder_k.parameters()],
                 "queue": model.queue, "ptr": model.queue_ptr, "compiles": compiles, "graph": graph,
                 "startup_collectives": startup, "step_collectives": step_collectives, "products": step_products,
                 "bn_mean": [m.running_mean for m in model.encoder_q.modules()
                             if isinstance(m, nn.modules.batchnorm._NormBase)]})


def knn(rt, cfg) -> dict:
    """The kNN monitor on replicas whose BN statistics drifted apart, before and after syncing them."""
    from moco_xla import data
    from moco_xla.eval.knn import embed, knn_accuracy
    from moco_xla.models import build_encoder
    rt.manual_seed(0)
    with rt.cpu_rng():  # the same init on every replica
        net = build_encoder(cfg.model).backbone
    net.to(rt.device)
    bundle = data.build(cfg)
    e = cfg.eval
    # BN in training mode on this replica's own images: running statistics differ per replica
    mine = torch.stack([bundle.bank[i][0] for i in range(rt.rank * 16, (rt.rank + 1) * 16)]).to(rt.device)
    with torch.no_grad():
        net.train()(mine)
    rt.mark_step()
    drifted, _ = embed(rt, net.eval(), bundle.bank, e.batch_size, e.max_bank)
    rt.sync_batchnorm_stats(net)
    bn_sync = collective_types(rt, net.buffers())  # what checkpoints and evaluations run first
    bank, labels = embed(rt, net.eval(), bundle.bank, e.batch_size, e.max_bank)
    gather = collective_types(rt, [bank, labels])
    similarity, precise_matmul = [], rt.precise_matmul

    def recorded(a, b):  # the graph of each similarity matrix knn_accuracy scores
        sim = precise_matmul(a, b)
        similarity.append(products(rt, [sim]))
        return sim
    rt.precise_matmul = recorded
    top1 = knn_accuracy(rt, net, bundle.bank, bundle.test, bundle.num_classes, e.knn_k, e.knn_t, e.batch_size,
                        e.max_bank)
    del rt.precise_matmul
    score = collective_types(rt, [top1])
    # the same kNN by one replica alone (no collectives), on the same device: what N must equal
    from moco_xla.runtime import Runtime
    alone = knn_accuracy(Runtime(rt.device), net, bundle.bank, bundle.test, bundle.num_classes, e.knn_k, e.knn_t,
                         e.batch_size, e.max_bank)
    return _cpu({"drifted": drifted, "bank": bank, "labels": labels, "top1": float(top1),
                 "collectives": {"BN sync": bn_sync, "kNN bank gather": gather, "kNN score": score},
                 "similarity_products": similarity,
                 "top1_alone": float(alone), "state": net.state_dict()})


def labelprop(rt) -> dict:
    """The study's label propagation on N replicas (the gathered pixel bank, graph and labels)."""
    from eval_fns import study_propagation
    return study_propagation(rt)


def everything(rt, cfg, per: int, steps: int) -> dict:
    """All of the above in one start (each start of N replicas costs seconds of set-up)."""
    out = {}
    for name, fn, args in (("collectives", collectives, ()), ("shuffle", shuffle_keys, (per,)),
                           ("train", train_steps, (cfg, steps)), ("knn", knn, (cfg,)), ("labelprop", labelprop, ())):
        t0 = time.time()
        out[name] = fn(rt, *args)
        rt.mark_step()
        out[f"{name}_s"] = time.time() - t0  # start the next check from an empty graph (and a fresh collective token)
    return out


def cached_steps(rt, cfg, steps: int) -> dict:
    """A few MoCo steps with the persistent compilation cache on ($MOCO_XLA_COMPILE_CACHE): its counters."""
    import torch_xla.debug.metrics as met
    out = train_steps(rt, cfg, steps)
    counters = {name: met.counter_value(name) or 0 for name in
                ("PersistentCacheMiss", "PersistentCacheHit", "PersistentCacheDeserializeFailure")}
    return {"cache": counters, "compiles": out["compiles"], "q": out["q"]}


def late_replica(rt, late_s: float) -> dict:
    """The last replica reaches a graph with an all-reduce ``late_s`` seconds after the others (as one
    still starting DataLoader workers or loading a checkpoint does); returns the sum and the wait."""
    x = torch.full((3,), float(rt.rank + 1)).to(rt.device)
    total = rt.all_reduce(x)
    if rt.rank == rt.world_size - 1:
        time.sleep(late_s)
    start = time.time()
    rt.mark_step()
    return {"sum": _cpu(total), "waited_s": time.time() - start}


def credited_compiles(rt, late_s: float) -> dict:
    """Replica 0 is still in its training window while the others enter a region and compile a graph
    no replica ran before (through a host read: launches there are not aligned). Returns the
    compilations credited to this replica and the graph check's report (replica 0's adds up all)."""
    import torch_xla.debug.metrics as met
    from moco_xla.profiling import GraphWatch
    process_before = met.metric_data("CompileTime")
    watch = GraphWatch(rt, warmup=0, mode="warn")
    watch.step()
    watch.step()  # past the warm-up: a compilation in the training window now is a violation
    if rt.rank == 0:
        time.sleep(late_s)
    before = rt.counters()["compiles"]
    watch.enter("epoch_end")
    x = torch.full((7,), 2.0).to(rt.device)
    value = float((x * x + 1).sum())  # a new graph: the first replica to reach it compiles it
    watch.enter("train")
    own = rt.counters()["compiles"] - before
    with watch.region("sync"):
        rt.barrier()  # compiles the barrier's graph (one replica does)
    rt.barrier()  # its graph cached: every replica's windows are closed before replica 0 adds them up
    process = met.metric_data("CompileTime")[0] - (process_before[0] if process_before else 0)
    return {"value": value, "own": own, "report": watch.report(), "process": process}
