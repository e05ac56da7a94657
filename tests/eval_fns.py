"""Helpers for the evaluation tests: synthetic point sets, gloo replica functions, one shared pre-training."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parent.parent

# The shortest digits pre-training (the quickstart at width 16 for 12 epochs instead of 32 for 20)
# whose probe still clearly beats a random-init encoder and raw pixels with 50 labels.
PRETRAIN_SET = ["train.epochs=12", "moco.nn_warmup_epochs=6", "model.width=16", "eval.knn_every=6",
                "checkpoint.every=12", "train.log_every=3"]


def tiny_checkpoint(directory: Path) -> tuple[Path, nn.Module]:
    """A checkpoint of the untrained tiny model in ``directory``: enough for the CLIs' plumbing."""
    from moco_xla.config import load_config
    from moco_xla.runtime import make_runtime
    from moco_xla.train import build_model
    cfg = load_config("tiny")
    model = build_model(cfg, make_runtime("local"))
    path = Path(directory) / "checkpoints" / "ckpt-000000000.pt"
    path.parent.mkdir()
    torch.save({"config": cfg.to_dict(), "model": model.state_dict()}, path)
    return path, model


class Points(Dataset):
    """Feature vectors with integer labels, shaped like an image dataset: (x, label)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def clusters(n: int, classes: int, dim: int, seed: int, spread: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points around ``classes`` random unit directions (class i % classes), well separated."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(99)))[0][:classes]
    y = torch.arange(n) % classes
    x = centres[y] + spread * torch.randn(n, dim, generator=g)
    return x, y


def knn_on_points(rt, bank: tuple, test: tuple, classes: int, k: int, batch: int) -> dict:
    """kNN accuracy and the gathered bank on this replica (identity network: the points are features)."""
    from moco_xla.eval.knn import embed, knn_accuracy
    net = nn.Identity()
    bank_ds, test_ds = Points(*bank), Points(*test)
    acc = knn_accuracy(rt, net, bank_ds, test_ds, classes, k=k, t=0.1, batch=batch)
    feats, labels = embed(rt, net, bank_ds, batch)
    return {"acc": float(acc), "bank": feats, "labels": labels}


def probe_on_points(rt, train: tuple, test: tuple, classes: int, epochs: int, batch: int) -> dict:
    """A linear probe on this replica's share of the points; returns its accuracy and weights."""
    from moco_xla.schedule import SGDSpec
    from moco_xla.eval.probe import extract, head_accuracy, train_probe
    net = nn.Identity()
    tr = extract(rt, net, Points(*train), 16)
    te = extract(rt, net, Points(*test), 16)
    sgd = SGDSpec(lr=1.0, momentum=0.9, schedule="cosine")
    head = train_probe(rt, tr, classes, sgd, epochs, len(train[1]) // batch, batch, seed=0)
    return {"acc": float(head_accuracy(rt, head, te)), "weight": head.weight.detach().clone(),
            "count": tr.count}


def pretrained_run(tmp_path_factory) -> Path:
    """A short run of the quickstart (the default config, digits), once per test session, through the real CLI.

    The suite's xdist workers share it: the first to ask trains it under a file lock in the directory
    above the workers' own temporary directories; the others wait and read it.
    """
    from filelock import FileLock
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = root / "pretrained"
    with FileLock(str(root / "pretrained.lock")):
        if not (out / "summary.json").exists():
            args = [sys.executable, "-m", "moco_xla.launch", "--out", str(out)]
            for item in PRETRAIN_SET:
                args += ["--set", item]
            p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900,
                               env={**os.environ, "PJRT_DEVICE": "CPU"})
            assert p.returncode == 0, p.stderr[-3000:]
    return out


def random_init_knn(config: str, sets: list[str]) -> float:
    """kNN top-1 of ``config``'s query encoder as initialised (no training): the floor pre-training must beat."""
    from moco_xla import data
    from moco_xla.config import load_config
    from moco_xla.eval.knn import knn_accuracy
    from moco_xla.runtime import make_runtime
    from moco_xla.train import build_model
    cfg = load_config(config, sets)
    rt = make_runtime("local")
    bundle = data.build(cfg)
    model = build_model(cfg, rt)
    e = cfg.eval
    return float(knn_accuracy(rt, model.encoder_q.backbone, bundle.bank, bundle.test, bundle.num_classes,
                              e.knn_k, e.knn_t, e.batch_size, e.max_bank))


def run_eval(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m moco_xla.eval ARGS`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "moco_xla.eval", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PJRT_DEVICE": "CPU"})


GRIDS = (("probe_lr", 1, 3), ("finetune_lr", 0.01, 0.03), ("lr", 0.05, 0.1), ("labelprop_k", 5, 10),
         ("pixel_c", 0.1, 1))
# two folds and two candidates a row: cross-validation in tests at a bounded cost
SMALL_SELECT = ["eval.semisup.select.folds=2", *[f"eval.semisup.select.{g}=[{a},{b}]" for g, a, b in GRIDS]]


def xla_compiles(ckpt: str, out: str) -> dict:
    """Run the three evaluations on XLA (one replica) twice, the second time longer; count compilations.

    Longer runs must reuse the graphs of shorter ones: no recompilation per step or per epoch
    (a learning rate that changes, a new index batch). Run it in a fresh process (PJRT_DEVICE=CPU).
    """
    import torch_xla.debug.metrics as met
    from moco_xla.eval.command import Job, eval_config, run_knn
    from moco_xla.eval.lincls import run_linear
    from moco_xla.eval.fewlabels import run_semisup
    from moco_xla.report import MetricsWriter
    from moco_xla.runtime import make_runtime

    def compiles() -> int:
        data = met.metric_data("CompileTime")
        return data[0] if data else 0

    rt = make_runtime("xla")
    counts, results = {}, {}
    # linear: 1 epoch already holds every graph of a longer run (its epochs differ only in the
    # learning rate); semisup trains with one step per epoch, so its steady graph needs 2.
    runs = (("linear", run_linear, "eval.probe.epochs", (1, 3)),
            ("semisup", run_semisup, "eval.semisup.steps", (2, 4)))
    for name, runner, key, lengths in runs:
        for length in lengths:
            sets = [f"{key}={length}", "eval.probe.batch_size=64", "eval.probe.eval_every=1",
                    "eval.semisup.labels=20", f"eval.semisup.distill.steps={length}",
                    "eval.semisup.distill.batch_size=32", *SMALL_SELECT]
            cfg = eval_config(ckpt, None, sets)
            before = compiles()
            results[f"{name}{length}"] = runner(Job(name, ckpt, cfg, out), rt, MetricsWriter(out, enabled=False))
            counts[f"{name}{length}"] = compiles() - before
    results["knn"] = run_knn(Job("knn", ckpt, eval_config(ckpt, None, []), out), rt, MetricsWriter(out, enabled=False))
    return {"compiles": counts, "results": results, "device": str(rt.device)}


def study_propagation(rt) -> dict:
    """The study's propagated_labels on raw pixels of the tiny digits (20 labels), on ``rt``'s replicas; and on
    a seeded conv layer's features joined with the pixels (eval.semisup.labelprop.pixel_weight 0.5)."""
    from moco_xla import data
    from moco_xla.eval.fewlabels_split import propagated_labels, semisup_split
    from moco_xla.data.subsets import train_labels
    from moco_xla.config import load_config
    from moco_xla.eval.labelprop import graph_features
    cfg = load_config("tiny", ["eval.semisup.labels=20", "eval.batch_size=64"])
    bundle = data.build(cfg)
    split = semisup_split(cfg, bundle)
    labels = propagated_labels(rt, nn.Flatten(), bundle.bank, split, 10, 5, cfg)
    rt.manual_seed(0)  # the same conv layer on every replica, drawn from the replica's own CPU stream (replica
    with rt.cpu_rng():  # threads of one process share torch's global generator, and seeding it races)
        conv = nn.Sequential(nn.Conv2d(cfg.model.in_channels, 4, 3, stride=2), nn.Flatten())
    joined = propagated_labels(rt, graph_features(conv, 0.5), bundle.bank, split, 10, 5, cfg)
    truth = train_labels(bundle.bank)[split.pool]
    return {"labels": labels, "accuracy": float((labels == truth).float().mean() * 100), "joined": joined,
            "joined_accuracy": float((joined == truth).float().mean() * 100),
            "seeds_kept": bool(torch.equal(labels[torch.searchsorted(split.pool, split.picked)], split.labels))}


def precise_bn_on_points(rt, x: torch.Tensor, y: torch.Tensor, batch: int) -> dict:
    """BatchNorm1d's statistics as precise BN recomputes them on this replica's share of the points."""
    from moco_xla.eval.precise_bn import precise_bn
    bn = nn.BatchNorm1d(x.shape[1])
    with precise_bn(rt, bn, Points(x, y), batch):
        return {"mean": bn.running_mean.clone(), "var": bn.running_var.clone()}
