"""``python -m moco_xla.bench fewlabels``: the few-label study from pre-training to the table, one command.

    python -m moco_xla.bench fewlabels --config digits_fewlabels --labels 50,100,250 --draws 0,1,2
    python -m moco_xla.bench fewlabels --config mnist_fewlabels --set data.root=../shared/data/mnist-dev \\
        --out runs/fewlabels-mnist-dev --results benchmarks/results/fewlabels-mnist-dev.json

Pre-trains the config once (``moco_xla.launch --resume auto``: a stopped pre-training continues),
then runs the study (``moco_xla.eval semisup``: every row, each row's setting chosen by
cross-validation on its labelled images) for every label count and draw, each in its own
directory; a study whose summary.json already holds its result is not run again, so the command
resumes where it stopped. Last, it writes the results JSON (the pre-training's kNN beside the
raw-pixel kNN, every study with its choices and margins) and, beside it, the markdown table that
the README and docs/fewlabels.md show. ``--set`` applies to the pre-training and the studies.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from .. import cli
from ..config import load_config
from ..errors import UserError
from ..eval.rows import ROWS, study_margins, study_titles
from ..eval.select import choice_label
from ..report import read_metrics, read_summary
from .cli import machine


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = cli.parser("python -m moco_xla.bench fewlabels", __doc__)
    p.add_argument("--config", default="digits_fewlabels", help="the pre-training and study config")
    p.add_argument("--labels", default="100", help="comma-separated label counts (default 100)")
    p.add_argument("--draws", default="0,1,2", help="comma-separated draws of the labelled images (seeds)")
    p.add_argument("--out", default=None, help="runs directory (default runs/fewlabels-<config>)")
    p.add_argument("--results", default=None,
                   help="results JSON; the markdown table is written beside it (default <out>/fewlabels.json)")
    p.add_argument("--backend", default="auto", help="as for moco_xla.launch")
    p.add_argument("--cores", type=int, default=None, help="replicas, as for moco_xla.launch")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the pre-training and every study (repeatable)")
    return p.parse_args(argv)


def numbers(flag: str, text: str, low: int) -> list[int]:
    """A comma-separated list of whole numbers >= ``low``; UserError naming the flag otherwise."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < low:
        raise UserError(f"{flag} {text!r}: give comma-separated whole numbers >= {low}, e.g. {flag} 50,100,250")
    return values


def main(argv: list[str]) -> int:
    def bench() -> int:
        args = parse_args(argv)
        args.command = "python -m moco_xla.bench fewlabels " + " ".join(argv)
        return run(args)
    return cli.run(bench, argv)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # a bad config or override fails here, before any work
    labels, draws = numbers("--labels", args.labels, 1), numbers("--draws", args.draws, 0)
    out = cli.out_dir(Path(args.out or f"runs/fewlabels-{cfg.name}"))
    results = Path(args.results) if args.results else out / "fewlabels.json"
    common = ["--backend", args.backend, *(["--cores", str(args.cores)] if args.cores else [])]
    sets = [item for o in args.overrides for item in ("--set", o)]
    pretrain = out / "pretrain"
    if "final_loss" not in read_summary(pretrain):
        python_m("moco_xla.launch", "--config", args.config, "--out", str(pretrain), "--resume", "auto",
                 *common, *sets)
    studies: dict[str, dict[str, Any]] = {}
    report = {"command": getattr(args, "command", ""), "machine": machine(), "config": cfg.name,
              "overrides": args.overrides, "pretrain": pretrain_record(pretrain), "studies": studies}
    for n in labels:
        for draw in draws:
            where = out / "studies" / f"labels-{n}-draw-{draw}"
            if str(n) not in read_summary(where).get("semisup", {}):
                python_m("moco_xla.eval", "semisup", "--ckpt", str(pretrain), "--config", args.config,
                         "--labels", str(n), "--out", str(where), *common, *sets,
                         "--set", f"eval.semisup.seed={draw}")
            studies.setdefault(str(n), {})[str(draw)] = read_summary(where)["semisup"][str(n)]
            write_results(results, report)  # after every study: a stopped run leaves what it finished
    print(results.with_suffix(".md").read_text())
    print(f"results in {results} and {results.with_suffix('.md')}")
    return 0


def python_m(module: str, *argv: str) -> None:
    """Run ``python -m module argv`` as a user would; its failure stops the benchmark with its exit code."""
    print(f"bench fewlabels: python -m {module} {' '.join(argv)}", flush=True)
    done = subprocess.run([sys.executable, "-m", module, *argv])
    if done.returncode:
        raise SystemExit(done.returncode)


def pretrain_record(run_dir: Path) -> dict[str, Any]:
    """The pre-training's summary figures and its kNN curve ([epoch, kNN top-1] at each monitor)."""
    summary = read_summary(run_dir)
    keys = ("config", "knn_top1", "pixel_knn_top1", "epochs", "wall_s", "world_size", "backend")
    curve = [[r["epoch"], r["knn_top1"]] for r in read_metrics(run_dir)
             if r.get("type") == "epoch" and r.get("knn_top1") is not None]
    return {**{key: summary.get(key) for key in keys}, "knn_curve": curve}


def write_results(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    """The results as the README shows them: per label count, every row per draw and its mean, the
    settings cross-validation chose, then the margins of the best MoCo row per draw."""
    p = report["pretrain"]
    lines = [f"Pre-training `{report['config']}`: kNN {fmt(p['knn_top1'])}% against {fmt(p['pixel_knn_top1'])}% "
             f"for the centred raw pixels (same protocol), {minutes(p['wall_s'])} on {p['world_size']} x "
             f"{p['backend']}.", ""]
    for n in sorted(report["studies"], key=int):
        lines += label_table(n, report["studies"][n]) + [""]
    return "\n".join(lines)


def label_table(n: str, by_draw: dict[str, dict]) -> list[str]:
    draws = list(by_draw)
    first = by_draw[draws[0]]
    titles = study_titles(first)
    folds = first.get("select", {}).get("folds", 0)
    chosen_by = (f"{folds}-fold cross-validation on the {n} labelled images" if folds
                 else "no selection (the configured values)")
    lines = [f"**{n} labels** ({first['per_class']:g} per class), top-1 % on the {first['test_images']} test images; "
             f"each row's setting chosen by {chosen_by}, per draw:", "",
             "| row | " + " | ".join(f"draw {d}" for d in draws) + " | mean | chosen |",
             "|---|" + "---:|" * (len(draws) + 1) + "---|"]
    for row in ROWS:
        if row.key not in titles:
            continue
        values = [by_draw[d]["rows"][row.key] for d in draws]
        chosen = " / ".join(choice_label(by_draw[d].get("selection", {}).get(row.key)) for d in draws)
        lines.append(f"| {titles[row.key]} | " + " | ".join(f"{v:.2f}" for v in values)
                     + f" | {sum(values) / len(values):.2f} | {chosen} |")
    for key, what in (("over_no_pretraining", "best MoCo row over the strongest row without pre-training"),
                      ("over_scratch", "best MoCo row over the best from-scratch row")):
        per = [study_margins(by_draw[d]).get(key) for d in draws]
        if all(per):
            margins = [m["margin"] for m in per]
            lines.append(f"| **{what}** | " + " | ".join(f"{m:+.2f}" for m in margins)
                         + f" | {sum(margins) / len(margins):+.2f} | " + " / ".join(m["row"] for m in per) + " |")
    return lines


def fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def minutes(wall_s: Any) -> str:
    return "-" if wall_s is None else f"{wall_s / 60:.1f} min"
