"""``python -m moco_xla.bench replicas``: does MoCo learn as well on N replicas as on one?

    python -m moco_xla.bench replicas --config digits --epochs 10 --replicas 1,4,8 --backends cpu,xla \\
        --seeds 0,1,2 --results benchmarks/results/replicas-digits.json

A user who moves from one core to eight keeps the global batch and the BN group size and expects the
same result. Every run here trains the config as a user would (``moco_xla.launch``) with the same
global batch (``train.batch_size``) and the same number of images per BatchNorm group
(``model.bn_splits`` = per-replica batch / ``--bn-group``): the cpu backend's replicas are gloo
processes, the xla backend's are XLA:CPU replicas (the rehearsal; bf16, the TPU default). XLA rows
also run in fp32 at the replica counts of ``--xla-fp32`` (bf16 against fp32 on the same replicas).

Each run has its own directory under ``--out``; a finished run is not run again, and a run that
stops (XLA:CPU aborts a replica that waits over 10 s for a collective on a loaded machine) is resumed
from its checkpoint (``--resume auto``), the attempts recorded. After every run the results JSON and,
beside it, a markdown table are written: per row the kNN of every seed, the mean, and the mean's
distance from the one-replica mean of the same backend and precision.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .. import cli
from ..config import load_config
from ..errors import UserError
from ..report import read_summary
from .cli import machine
from .fewlabels import numbers

BACKENDS = ("cpu", "xla")
ATTEMPTS = 3  # a run that stops is resumed from its checkpoint at most twice


@dataclass(frozen=True)
class Run:
    """One training run of the matrix."""
    backend: str
    replicas: int
    precision: str  # "auto" (the backend's default: fp32 on cpu, bf16 on xla) or "fp32"
    seed: int

    @property
    def row(self) -> str:
        return f"{self.backend}-{self.replicas}-{self.precision}"

    @property
    def name(self) -> str:
        return f"{self.row}-seed{self.seed}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = cli.parser("python -m moco_xla.bench replicas", __doc__)
    p.add_argument("--config", default="digits", help="the config every run trains (default digits)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per run (default 10)")
    p.add_argument("--replicas", default="1,4,8", help="comma-separated replica counts (default 1,4,8)")
    p.add_argument("--backends", default="cpu,xla", help="comma-separated: cpu (gloo processes), xla (XLA:CPU "
                                                          "replicas, the rehearsal); default cpu,xla")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated train.seed values (default 0,1,2)")
    p.add_argument("--bn-group", type=int, default=16, help="images per BatchNorm group in every run (default 16)")
    p.add_argument("--xla-fp32", default="8", help="replica counts whose XLA rows also run in fp32 "
                                                   "(comma-separated; 'none' for none; default 8)")
    p.add_argument("--out", default=None, help="runs directory (default runs/replicas-<config>)")
    p.add_argument("--results", default=None,
                   help="results JSON; the markdown table is written beside it (default <out>/replicas.json)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run (repeatable)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    def bench() -> int:
        args = parse_args(argv)
        args.command = "python -m moco_xla.bench replicas " + " ".join(argv)
        return run(args)
    return cli.run(bench, argv)


def plan(args: argparse.Namespace, global_batch: int) -> list[Run]:
    """The runs, seed by seed (every row has a figure after the first seed); UserError for a matrix that
    cannot keep the global batch and the BN group (both must divide evenly)."""
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in backends if b not in BACKENDS]
    if bad or not backends:
        raise UserError(f"--backends {args.backends!r}; valid: {', '.join(BACKENDS)} (comma-separated)")
    replicas, seeds = numbers("--replicas", args.replicas, 1), numbers("--seeds", args.seeds, 0)
    fp32 = [] if args.xla_fp32 == "none" else numbers("--xla-fp32", args.xla_fp32, 1)
    if args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    for n in replicas:
        bn_splits(global_batch, n, args.bn_group)
    runs = []
    for seed in seeds:
        for backend in backends:
            for n in replicas:
                precisions = ["auto"] + (["fp32"] if backend == "xla" and n in fp32 else [])
                runs += [Run(backend, n, p, seed) for p in precisions]
    return runs


def bn_splits(global_batch: int, replicas: int, group: int) -> int:
    """Split BN factor that gives every BN group ``group`` images at this replica count."""
    per_replica, rest = divmod(global_batch, replicas)
    if rest or group < 1 or per_replica % group:
        raise UserError(f"--replicas {replicas} with --bn-group {group}: the global batch {global_batch} must split "
                        f"into {replicas} equal per-replica batches that are multiples of the BN group")
    return per_replica // group


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # a bad config or override fails here, before any work
    runs = plan(args, cfg.train.batch_size)
    out = cli.out_dir(Path(args.out or f"runs/replicas-{cfg.name}"))
    results = Path(args.results) if args.results else out / "replicas.json"
    report: dict[str, Any] = {
        "command": getattr(args, "command", ""), "machine": machine(), "config": cfg.name,
        "overrides": args.overrides, "epochs": args.epochs, "global_batch": cfg.train.batch_size,
        "bn_group": args.bn_group, "runs": {}}
    with exclusive(out):
        for r in runs:
            record(r, out, args, cfg.train.batch_size, report, results)
    print(results.with_suffix(".md").read_text())
    print(f"results in {results} and {results.with_suffix('.md')}")
    return 0


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold ``<out>/.lock`` for the whole benchmark: a second invocation on the same runs would train
    into the same directories at the same time; it ends with a one-line error instead."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another bench replicas is running on {out}; wait for it or pass another --out") from None
        yield


def record(r: Run, out: Path, args: argparse.Namespace, global_batch: int, report: dict[str, Any],
           results: Path) -> None:
    """Train one run (unless finished) and rewrite the results with it."""
    where = out / r.name
    attempts = train(r, where, args, global_batch)
    report["runs"][r.name] = run_record(r, read_summary(where), attempts)
    report["rows"] = rows(report["runs"])
    report["precision"] = precision_gaps(report["rows"])
    write_results(results, report)  # after every run: a stopped benchmark leaves what it finished


def train(r: Run, where: Path, args: argparse.Namespace, global_batch: int) -> int | None:
    """Train ``r`` into ``where`` unless it finished before; the launches it took, by every invocation
    (``<where>/launches.txt``: one line per start, so a resumed run says so in the results; None for a
    run finished before that file was kept)."""
    sets = [*args.overrides, f"train.epochs={args.epochs}", f"eval.knn_every={args.epochs}",
            f"train.seed={r.seed}", f"model.bn_splits={bn_splits(global_batch, r.replicas, args.bn_group)}",
            f"train.precision={r.precision}"]
    argv = ["--config", args.config, "--backend", r.backend, "--cores", str(r.replicas), "--out", str(where),
            "--resume", "auto", *[a for s in sets for a in ("--set", s)]]
    env = {"PJRT_DEVICE": "CPU"} if r.backend == "xla" else {}
    log = where / "launches.txt"
    for attempt in range(ATTEMPTS + 1):
        if "final_loss" in read_summary(where):
            return len(log.read_text().splitlines()) if log.exists() else None
        if attempt == ATTEMPTS:
            break
        print(f"bench replicas: {r.name} (attempt {attempt + 1}): python -m moco_xla.launch {' '.join(argv)}",
              flush=True)
        where.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write(" ".join(["python -m moco_xla.launch", *argv]) + "\n")
        subprocess.run([sys.executable, "-m", "moco_xla.launch", *argv], env={**os.environ, **env})
    raise UserError(f"bench replicas: {r.name} did not finish in {ATTEMPTS} attempts; see {where}")


def run_record(r: Run, summary: dict[str, Any], attempts: int | None) -> dict[str, Any]:
    graph = summary.get("xla_graph") or {}
    return {"backend": r.backend, "replicas": r.replicas, "precision": summary.get("precision"), "seed": r.seed,
            "row": r.row, "knn_top1": summary.get("knn_top1"), "final_loss": summary.get("final_loss"),
            "wall_s": summary.get("wall_s"), "world_size": summary.get("world_size"),
            "compiles_after_warmup": graph.get("compiles_after_warmup"), "launches": attempts}


def rows(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per row (backend, replicas, precision): the kNN per seed, mean, sample standard deviation, and the
    mean minus the one-replica mean of the same backend and precision."""
    by_row: dict[str, list[dict[str, Any]]] = {}
    for rec in runs.values():
        by_row.setdefault(rec["row"], []).append(rec)
    out = []
    for key, recs in by_row.items():
        knn = [rec["knn_top1"] for rec in recs]
        out.append({"row": key, "backend": recs[0]["backend"], "replicas": recs[0]["replicas"],
                    "precision": recs[0]["precision"], "seeds": [rec["seed"] for rec in recs], "knn_top1": knn,
                    "mean": statistics.fmean(knn), "std": statistics.stdev(knn) if len(knn) > 1 else None,
                    "wall_s_mean": statistics.fmean(rec["wall_s"] for rec in recs),
                    "compiles_after_warmup": max((rec["compiles_after_warmup"] or 0) for rec in recs)
                    if recs[0]["backend"] == "xla" else None})
    for row in out:
        ref = next((o for o in out if o["backend"] == row["backend"] and o["precision"] == row["precision"]
                    and o["replicas"] == 1), None)
        row["minus_one_replica"] = None if ref is None else row["mean"] - ref["mean"]
    return sorted(out, key=lambda o: (o["backend"], o["precision"], o["replicas"]))


def precision_gaps(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """bf16 against fp32 on the same XLA replicas: the default's mean minus the fp32 mean."""
    gaps = []
    for fp32 in (row for row in table if row["backend"] == "xla" and row["row"].endswith("-fp32")):
        bf16 = next((row for row in table if row["row"] == f"xla-{fp32['replicas']}-auto"), None)
        if bf16 is not None:
            gaps.append({"replicas": fp32["replicas"], "bf16_mean": bf16["mean"], "fp32_mean": fp32["mean"],
                         "bf16_minus_fp32": bf16["mean"] - fp32["mean"]})
    return gaps


def write_results(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(report))


def replicas_name(backend: str, n: int) -> str:
    if backend == "xla":
        return f"{n} XLA:CPU replica{'s' if n > 1 else ''}"
    return "1 CPU process" if n == 1 else f"{n} gloo processes"


def markdown(report: dict[str, Any]) -> str:
    """The table docs/benchmarks.md shows: one line per row, seeds side by side."""
    seeds = sorted({s for row in report["rows"] for s in row["seeds"]})
    lines = [f"`{report['config']}`, {report['epochs']} epochs, global batch {report['global_batch']}, "
             f"{report['bn_group']} images per BN group in every run; kNN top-1 % on the held-out images.", "",
             "| replicas | precision | " + " | ".join(f"seed {s}" for s in seeds)
             + " | mean | std | mean - 1 replica | wall (mean) | compiles after warm-up |",
             "|---|---|" + "---:|" * (len(seeds) + 5)]
    for row in report["rows"]:
        by_seed = dict(zip(row["seeds"], row["knn_top1"]))
        cells = [replicas_name(row["backend"], row["replicas"]), row["precision"],
                 *(maybe(by_seed.get(s), "{:.2f}") for s in seeds), f"{row['mean']:.2f}",
                 maybe(row["std"], "{:.2f}"), maybe(row["minus_one_replica"], "{:+.2f}"),
                 f"{row['wall_s_mean']:.0f} s", maybe(row["compiles_after_warmup"], "{}")]
        lines.append("| " + " | ".join(cells) + " |")
    for gap in report.get("precision", []):
        lines += ["", f"bf16 - fp32 on {replicas_name('xla', gap['replicas'])}: {gap['bf16_minus_fp32']:+.2f} "
                      f"(means {gap['bf16_mean']:.2f} and {gap['fp32_mean']:.2f})."]
    return "\n".join(lines) + "\n"


def maybe(value: Any, form: str) -> str:
    return "-" if value is None else form.format(value)
