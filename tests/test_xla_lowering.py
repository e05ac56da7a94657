"""XLA lowering on one XLA:CPU device: collectives in the graph, bf16 precision, the graph guard, eval loops.

Everything XLA runs once, in a child process (``python tests/test_xla_lowering.py OUT``), so
torch_xla state never leaks into other tests; the tests below assert on what it recorded.
XLA_ALWAYS_ALLREDUCE=1 makes torch_xla compile and run the real collectives at world size 1.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.needs_xla  # XLA:CPU replicas: skipped where torch_xla is not installed

ROOT = Path(__file__).resolve().parent.parent
XLA_ENV = {"PJRT_DEVICE": "CPU", "XLA_ALWAYS_ALLREDUCE": "1",
           "XLA_FLAGS": "--xla_backend_optimization_level=0",  # compile faster; same graphs
           "MOCO_XLA_GRAPH_CHECK": "warn", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def xla(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("xla") / "result.json"
    proc = subprocess.run([sys.executable, __file__, str(out)], env={**os.environ, **XLA_ENV},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- collectives

def test_all_gather_lowers_to_a_real_all_gather(xla):
    ops = xla["all_gather_ops"]
    assert ops == ["all-gather"], ops  # not torch_xla's default all-reduce of a padded buffer


@pytest.mark.parametrize("mode,op", [("gather", "all-gather"), ("all_to_all", "all-to-all")])
def test_shuffle_mode_lowering_and_bytes(xla, mode, op):
    r = xla["shuffle"][mode]
    assert r["ops"].count(op) == 2, r["ops"]  # images there, keys back
    if mode == "all_to_all":
        assert "all-gather" not in r["ops"]
    # BN statistics of a permuted batch are the same statistics: keys equal the plain encoder's
    assert r["max_abs_diff_vs_plain"] < 1e-4
    for world, (hlo, count) in r["bytes"].items():
        assert hlo == count > 0, (world, hlo, count)  # read from the graph == counted from shapes
    assert r["bytes"]["8"][0] > r["bytes"]["2"][0]


def test_all_to_all_moves_world_times_fewer_bytes(xla):
    g, a = xla["shuffle"]["gather"]["bytes"], xla["shuffle"]["all_to_all"]["bytes"]
    for world in ("2", "8"):
        assert g[world][0] == int(world) * a[world][0]


def test_all_to_all_falls_back_to_gather_with_a_warning_where_missing():
    import torch
    from moco_xla.moco import MoCo
    from moco_xla.runtime import Runtime

    class NoAllToAll(Runtime):  # a backend whose collectives lack all_to_all
        has_all_to_all = False

    rt = NoAllToAll(torch.device("cpu"))
    with pytest.warns(RuntimeWarning, match="no all_to_all; using gather"):
        model = MoCo(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)), rt, 3, 8,
                     shuffle="all_to_all")
    assert model.shuffle == "gather"
    loss, _ = model(torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2))
    assert torch.isfinite(loss)
    assert MoCo(torch.nn.Linear(4, 3), Runtime(torch.device("cpu")), 3, 8, shuffle="all_to_all").shuffle \
        == "all_to_all"


# ----------------------------------------------------------------------------- precision

def test_bf16_step_on_xla_convolutions_in_bf16_logits_and_loss_in_fp32(xla):
    p = xla["precision"]["bf16"]
    assert p["loss_dtype"] == "torch.float32" and p["finite"]
    assert p["bf16_convolutions"] > 0 and p["f32_convolutions"] == 0
    assert p["logits_dot_dtype"] == "f32"   # q @ queue stays fp32 under autocast
    assert p["resolved"] == "bf16"          # auto on XLA


@pytest.mark.parametrize("debias", ["0.0", "0.1"])
def test_moco_loss_lowers_whole_with_and_without_debiasing(xla, debias):
    """A MoCo step's loss, InfoNCE or its debiased form (moco.debias), runs as XLA ops: no op falls back
    to the CPU (a fallback is a device-to-host round trip inside every step)."""
    step = xla["losses"][debias]
    assert step["fallback_ops"] == 0 and step["transfers_from_device"] == 0
    assert step["finite"] and step["compiles"] > 0


def test_fp32_on_xla_has_no_bf16(xla):
    p = xla["precision"]["fp32"]
    assert p["loss_dtype"] == "torch.float32"
    assert p["bf16_convolutions"] == 0 and p["f32_convolutions"] > 0


# ----------------------------------------------------------------------------- the guard

def test_guard_catches_injected_item(xla):
    g = xla["guard"]
    assert g["clean"]["compiles_after_warmup"] == 0 and g["clean"]["unexpected_transfers"] == 0
    assert g["item"]["unexpected_transfers"] >= 1
    assert any("device-to-host" in v for v in g["item"]["violations"])
    assert g["item_error_raised"].startswith("GraphHygieneError")


def test_guard_catches_a_shape_that_changes(xla):
    g = xla["guard"]["shape"]
    assert g["compiles_after_warmup"] >= 1
    assert "compiled" in g["violation"]


def test_guard_passes_log_steps_that_read_values(xla):
    assert xla["guard"]["logged"]["unexpected_transfers"] == 0
    assert xla["guard"]["logged"]["violations"] == []


# ----------------------------------------------------------------------------- eval loops

def test_knn_monitor_compiles_once_and_reads_nothing_per_batch(xla):
    k = xla["knn"]
    assert k["test_batches"] >= 3
    assert k["first"]["compiles"] > 0
    assert k["second"]["compiles"] == 0
    for run in ("first", "second"):
        assert k[run]["transfers_from_device"] == 0  # returns a device scalar: no host read inside
        assert k[run]["fallback_ops"] == 0
    assert 0 <= k["accuracy"] <= 100


def test_linear_probe_loops_recompile_free_across_epochs(xla):
    p = xla["probe"]
    if p.get("skipped"):
        pytest.fail(f"moco_xla.eval.probe API changed: {p['skipped']}")
    assert p["epochs"] >= 3
    # Epoch 2 compiles one graph once (probe.fit's first step of an epoch differs from the
    # others: a fresh zeros loss sum, the previous step's sum folded into the next graph);
    # from epoch 3 on nothing compiles: no per-epoch recompilation from the LR schedule.
    assert p["compiles_per_epoch"][1] <= 1, p["compiles_per_epoch"]
    assert p["compiles_per_epoch"][2:] == [0] * (p["epochs"] - 2), p["compiles_per_epoch"]
    assert p["fallback_ops"] == 0
    assert p["transfers_per_epoch"][1:] == [p["transfers_per_epoch"][1]] * (p["epochs"] - 1)


# ============================================================================= child process

def _child(out: str) -> None:
    import torch
    from moco_xla.runtime import make_runtime

    torch.manual_seed(0)
    rt = make_runtime("xla")
    res = {"all_gather_ops": _all_gather_ops(rt), "shuffle": _shuffle(rt), "precision": _precision(rt),
           "guard": _guard(rt), "knn": _knn(rt), "probe": _probe(rt), "losses": _losses(rt)}
    Path(out).write_text(json.dumps(res))


def _tiny_bn_encoder(rt):
    import torch.nn as nn
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 8)).to(rt.device)


def _all_gather_ops(rt):
    import torch
    from moco_xla.profiling import collectives
    x = torch.randn(4, 3).to(rt.device)
    ops = [c.op for c in collectives(rt.graph_text([rt.all_gather(x * 2)]))]
    rt.mark_step()
    return ops


def _shuffle(rt):
    import torch
    from moco_xla.profiling import collectives, received_bytes
    from moco_xla.shuffle import bytes_per_step, shuffled_keys
    enc = _tiny_bn_encoder(rt)
    x = torch.randn(8, 1, 6, 6).to(rt.device)
    out = {}
    for mode in ("gather", "all_to_all"):
        with torch.no_grad():
            keys, _ = shuffled_keys(rt, enc, x, mode)
            hlo = rt.graph_text([keys])
            plain = enc(x)
        rt.mark_step()
        out[mode] = {
            "ops": [c.op for c in collectives(hlo) if c.op != "all-reduce"],
            "max_abs_diff_vs_plain": float((keys - plain).abs().max()),
            "bytes": {str(n): [received_bytes(hlo, n), bytes_per_step(mode, n, 8, 36, 8)] for n in (2, 8)},
        }
    return out


def _precision(rt):
    import gc
    import re
    import torch
    from moco_xla.config import load_config
    from moco_xla.train import build_model, build_optimizer
    cfg = load_config("tiny", ["model.width=4", "moco.symmetric=false", "train.batch_size=8", "moco.K=64"])
    res = {}
    for precision in ("auto", "fp32"):
        model = build_model(cfg, rt)
        opt = build_optimizer(cfg, model)
        q, k = torch.randn(8, 1, 16, 16).to(rt.device), torch.randn(8, 1, 16, 16).to(rt.device)
        with rt.autocast(precision):
            loss, _ = model(q, k)
        hlo = rt.graph_text([loss])
        dots = re.findall(r"= (\w+)\[8,64\]\{[0-9,]*\} dot\(", hlo)  # q [8,16] @ queue [16,64]
        resolved = rt.resolve_precision(precision)
        if resolved == "bf16":  # run one whole bf16 step (fp32 steps run in the other XLA tests)
            loss.backward()
            rt.optimizer_step(opt)
            rt.mark_step()
            finite = bool(torch.isfinite(loss).item())
        else:
            finite = None  # not run
        res["bf16" if resolved == "bf16" else "fp32"] = {
            "resolved": resolved, "loss_dtype": str(loss.dtype), "finite": finite,
            "bf16_convolutions": len(re.findall(r"= bf16\[[0-9,]*\]\{[0-9,]*\} convolution\(", hlo)),
            "f32_convolutions": len(re.findall(r"= f32\[[0-9,]*\]\{[0-9,]*\} convolution\(", hlo)),
            "logits_dot_dtype": dots[0] if dots else None,
        }
        del model, opt, loss  # drop the fp32 forward unrun: nothing of it reaches the next sync
        gc.collect()
    return res


def _losses(rt):
    """One MoCo training step per moco.debias setting: its counters (fallback ops, host reads)."""
    import torch
    from moco_xla.config import load_config
    from moco_xla.train import build_model, build_optimizer
    res = {}
    for debias in ("0.0", "0.1"):
        cfg = load_config("tiny", ["model.width=4", "train.batch_size=8", "moco.K=64", f"moco.debias={debias}"])
        model = build_model(cfg, rt)
        opt = build_optimizer(cfg, model)
        q, k = torch.randn(8, 1, 16, 16).to(rt.device), torch.randn(8, 1, 16, 16).to(rt.device)
        rt.mark_step()
        before = rt.counters()
        with rt.autocast("auto"):
            loss, _ = model(q, k)
        loss.backward()
        rt.optimizer_step(opt)
        rt.mark_step()
        res[debias] = {key: rt.counters()[key] - before[key] for key in before}
        res[debias]["finite"] = bool(torch.isfinite(loss).item())  # read after the counters
    return res


def _guard(rt):
    import torch
    import torch.nn as nn
    from moco_xla.profiling import GraphHygieneError, GraphWatch
    net = nn.Linear(6, 2).to(rt.device)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)

    def step(batch: int, inject_item: bool = False, log: bool = False) -> torch.Tensor:
        x = torch.randn(batch, 6).to(rt.device)
        loss = net(x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        rt.optimizer_step(opt)
        if inject_item:
            _ = loss.item()  # the bug the guard exists for: a host sync inside the step
        if log:
            rt.add_step_closure(lambda t: float(t), (loss.detach(),))  # a legitimate log read
        rt.mark_step()
        return loss

    def run(steps, mode="warn"):
        watch = GraphWatch(rt, warmup=3, mode=mode)
        for kwargs in steps:
            step(**kwargs)
            watch.step(log=kwargs.get("log", False))
        rep = watch.report()
        rep["violation"] = rep["violations"][0] if rep["violations"] else ""
        return rep

    res = {"clean": run([{"batch": 4}] * 8),
           "logged": run([{"batch": 4, "log": i % 3 == 2} for i in range(9)]),
           "item": run([{"batch": 4}] * 5 + [{"batch": 4, "inject_item": True}, {"batch": 4}]),
           "shape": run([{"batch": 4}] * 5 + [{"batch": 5}, {"batch": 5}])}
    try:
        run([{"batch": 4}] * 5 + [{"batch": 4, "inject_item": True}], mode="error")
        res["item_error_raised"] = ""
    except GraphHygieneError as e:
        res["item_error_raised"] = f"GraphHygieneError: {e}"
    return res


class _Images:
    """A float image dataset (eval transform already applied): what knn and probe loops read."""

    def __init__(self, n: int, seed: int) -> None:
        import torch
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 3
        self.x = torch.randn(n, 1, 6, 6, generator=g) + self.y.view(-1, 1, 1, 1).float()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def _knn(rt):
    import torch.nn as nn
    from moco_xla.eval.knn import knn_accuracy
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten()).to(rt.device)
    bank, test = _Images(40, 1), _Images(30, 2)
    res = {"test_batches": -(-len(test) // 8)}
    for run in ("first", "second"):
        rt.mark_step()
        before = rt.counters()
        acc = knn_accuracy(rt, net, bank, test, 3, k=5, t=0.1, batch=8)
        rt.mark_step()
        res[run] = {k: rt.counters()[k] - before[k] for k in before}
    res["accuracy"] = float(acc)
    return res


def _probe(rt):
    import torch.nn as nn
    try:
        from moco_xla.schedule import SGDSpec
        from moco_xla.eval.probe import extract, head_accuracy, train_probe
    except ImportError as e:
        return {"skipped": str(e)}
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten()).to(rt.device)
    feats = extract(rt, net, _Images(40, 3), batch=8)
    epochs, per_epoch = 4, 3
    marks = [rt.counters()]

    def on_epoch(epoch, lr, loss, head):
        rt.mark_step()  # the caller's epoch end: what fit queued runs here
        marks.append(rt.counters())

    head = train_probe(rt, feats, 3, SGDSpec(lr=0.5, schedule="cosine"), epochs, per_epoch, batch=8,
                       on_epoch=on_epoch)
    acc = float(head_accuracy(rt, head, feats))
    deltas = [{k: b[k] - a[k] for k in a} for a, b in zip(marks, marks[1:])]
    return {"epochs": epochs, "compiles_per_epoch": [d["compiles"] for d in deltas],
            "transfers_per_epoch": [d["transfers_from_device"] for d in deltas],
            "fallback_ops": sum(d["fallback_ops"] for d in deltas), "accuracy": acc}


if __name__ == "__main__":
    _child(sys.argv[1])
