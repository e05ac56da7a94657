"""``python -m moco_xla.eval``: how good is a pre-trained encoder? kNN, linear probe, few labels.

    python -m moco_xla.eval knn     --ckpt runs/digits-X               # newest checkpoint of a run
    python -m moco_xla.eval linear  --ckpt runs/digits-X/checkpoints/ckpt-000000360.pt
    python -m moco_xla.eval semisup --ckpt runs/digits-X --labels 100
    python -m moco_xla.eval linear  --ckpt gs://bucket/run/checkpoints --backend xla --cores 8

The model comes from the checkpoint, and so do the data and evaluation settings unless
``--config`` names a config whose ``data`` and ``eval`` sections replace them (a probe on
another dataset); ``--set`` overrides either (``--set eval.probe.lr=10``). Results go to
``--out`` (default: the run directory that holds the checkpoint): metrics.jsonl,
TensorBoard scalars, plots/*.png and summary.json; a table is printed at the end.
Replicas start as in ``moco_xla.launch`` (TPU cores, GPUs, gloo processes or torchrun).
Exit codes: 0 done, 2 bad input (errors.py).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import cli, data
from ..checkpoint import checkpoint_meta, find_checkpoint
from ..config import Config, apply_override, from_dict, load_config, validate
from ..data.subsets import read_labels_file
from ..errors import UserError
from ..report import MetricsWriter, read_summary, write_summary
from ..runtime import BACKENDS, Runtime, make_runtime, replicas
from ..runtime.plan import plan_replicas
from .encoder import Encoders
from .fewlabels import run_semisup
from .fewlabels_split import semisup_batch, summary_key
from .knn import knn_accuracy
from .lincls import run_linear
from .rows import selected_rows, study_margins, study_titles
from .select import choice_label

COMMANDS = ("knn", "linear", "semisup")


@dataclass
class Job:
    """What every replica needs (picklable: it crosses process boundaries)."""

    command: str
    ckpt: str
    cfg: Config
    out: str


# ----------------------------------------------------------------------------- command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser("python -m moco_xla.eval", __doc__, epilog=True)
    p.add_argument("command", choices=COMMANDS, help="knn: kNN monitor; linear: linear probe (lincls); "
                   "semisup: few-label study against a supervised baseline")
    p.add_argument("--ckpt", required=True,
                   help="a ckpt-*.pt file, a checkpoint directory or a run directory (newest checkpoint); "
                        "local or gs://")
    p.add_argument("--labels", type=int, default=None, help="semisup: labelled images (eval.semisup.labels)")
    p.add_argument("--labels-file", default=None, metavar="CSV",
                   help="semisup: your own labels instead of the seeded draw, one image a line: "
                        "'index,label' (position in the train split) or 'path,label' (folder datasets); "
                        "# comments and an 'index,label' header allowed (eval.semisup.labels_file)")
    p.add_argument("--config", default=None,
                   help="take the data and eval sections from this config instead of the checkpoint's")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="auto: TPU, then CUDA, then CPU")
    p.add_argument("--cores", type=int, default=None, help="replicas, as for moco_xla.launch")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set eval.probe.epochs=50 (repeatable)")
    p.add_argument("--out", default=None, help="output directory (default: the checkpoint's run directory)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p.parse_args(argv)


def eval_config(ckpt: str, config: str | None, overrides: list[str]) -> Config:
    """The checkpoint's config; ``config`` replaces its data and eval sections; then ``overrides``."""
    saved = checkpoint_meta(ckpt).get("config")
    if not isinstance(saved, dict):
        raise UserError(f"{ckpt} is not a moco_xla checkpoint (no config in it)")
    cfg = from_dict(saved)
    if config is not None:
        other = load_config(config)
        cfg.data, cfg.eval = other.data, other.eval
    for item in overrides:
        apply_override(cfg, item)
    validate(cfg)
    return cfg


def check_job(cfg: Config, command: str, world: int) -> None:
    """Batch splits that depend on the replica count; the study's row list."""
    p, s = cfg.eval.probe, cfg.eval.semisup
    if command == "linear" and p.batch_size % world:
        raise UserError(f"eval.probe.batch_size={p.batch_size} (global) must be divisible by the "
                        f"{world} replicas")
    if command == "semisup":
        selected_rows(s.rows)  # a bad list fails here, before replicas start
    if command == "semisup" and semisup_batch(cfg, world) < world:
        raise UserError(f"eval.semisup.labels={s.labels} gives fewer labelled images than the {world} "
                        f"replicas; use more labels or fewer --cores")


def use_labels_file(cfg: Config, path: str | None, labels: int | None) -> None:
    """Read and check ``--labels-file`` (or eval.semisup.labels_file) before replicas start; its rows set
    eval.semisup.labels."""
    s = cfg.eval.semisup
    if path is not None:
        s.labels_file = str(Path(path).resolve())
    if not s.labels_file:
        return
    data.check(cfg)
    bundle = data.build(cfg)
    picked, _ = read_labels_file(s.labels_file, bundle.bank, bundle.num_classes, cfg.data.root)
    if labels is not None and labels != len(picked):
        raise UserError(f"--labels {labels} disagrees with the {len(picked)} images of --labels-file "
                        f"{s.labels_file}; pass one of them")
    s.labels = len(picked)


def default_out(ckpt: str, cfg: Config) -> Path:
    """The run directory of a local checkpoint (<run>/checkpoints/ckpt-*.pt), else runs/eval-<name>-<time>."""
    if "://" not in ckpt:
        parent = Path(ckpt).resolve().parent
        return parent.parent if parent.name == "checkpoints" else parent
    return Path("runs") / cli.run_name(f"eval-{cfg.name}")


def run_knn(job: Job, rt: Runtime, writer: MetricsWriter) -> dict[str, Any]:
    """The training monitor's weighted kNN on the checkpoint's encoder (eval.knn_encoder, knn_layer, knn_k,
    knn_t, knn_bn, knn_centre)."""
    cfg, e = job.cfg, job.cfg.eval
    bundle = data.build(cfg)
    net = Encoders(cfg, job.ckpt).knn_features(rt)
    top1 = float(knn_accuracy(rt, net, bundle.bank, bundle.test, bundle.num_classes, e.knn_k, e.knn_t, e.batch_size,
                              e.max_bank, cfg.data.workers, e.knn_bn, e.knn_centre))
    setting = {"k": e.knn_k, "t": e.knn_t, "bn": e.knn_bn, "layer": e.knn_layer, "encoder": e.knn_encoder,
               "centre": e.knn_centre}
    writer.write({"type": "knn_eval", "knn_top1": top1, **setting})
    return {"knn_top1": top1, "knn": {"top1": top1, **setting, "ckpt": job.ckpt,
                                      "bank_images": len(bundle.bank), "test_images": len(bundle.test)}}


RUNNERS: dict[str, Callable[[Job, Runtime, MetricsWriter], dict[str, Any]]] = {
    "knn": run_knn, "linear": run_linear, "semisup": run_semisup}


def run_replica(backend: str, rank: int, world: int, local_rank: int, job: Job) -> dict[str, Any]:
    """The body of every replica: make the runtime, evaluate, write the summary on the master."""
    rt = make_runtime(backend, rank, world, local_rank)
    try:
        rt.manual_seed(job.cfg.train.seed)  # a private stream where replica threads share a process
        writer = MetricsWriter(job.out, enabled=rt.is_master)
        result = RUNNERS[job.command](job, rt, writer)
        if rt.is_master:
            write_summary(job.out, result)
        writer.close()  # after the summary: the plots read it
        return result
    finally:
        rt.shutdown()


def start(backend: str, cores: int, job: Job) -> None:
    """Run ``cores`` replicas of ``backend`` on this host (or be one replica under torchrun)."""
    replicas.start(backend, cores, run_replica, (job,))


# ----------------------------------------------------------------------------- report

def print_table(command: str, out: Path, cfg: Config) -> None:
    """The command's numbers from summary.json, as a short table."""
    s = read_summary(out)
    if command == "knn" and "knn" in s:
        k = s["knn"]
        print(f"  kNN top-1 (k={k['k']}, t={k['t']}): {k['top1']:.2f}%  "
              f"({k['bank_images']} bank / {k['test_images']} test images)")
    elif command == "linear" and "linear" in s:
        lin = s["linear"]
        print(f"  linear probe top-1: {lin['top1']:.2f}%  ({lin['epochs']} epochs, lr {lin['lr']:g}, "
              f"{lin['test_images']} test images)")
    elif command == "semisup":
        study = (s.get(summary_key(cfg)) or {}).get(str(cfg.eval.semisup.labels))
        if not study:
            return
        print_study(study)
    print(f"  results in {out} (summary.json, metrics.jsonl, plots/, tensorboard/)")


def print_study(study: dict[str, Any]) -> None:
    """One study's rows in the catalogue's order, the best (and any tied with it) marked."""
    where = study.get("scored_on", "test")
    where = "test" if where == "test" else where.split(" ", 1)[0]
    source = f"from {study['labels_file']}" if study.get("labels_file") else f"draw {study['seed']}"
    print(f"  {study['labels']} labelled images ({study['per_class']:g} per class, {source}); "
          f"{where} top-1 on {study['test_images']} images:")
    if study.get("diagnostic"):
        print(f"  DIAGNOSTIC ONLY: {study['diagnostic_note']}")
    shown = study_titles(study)
    width = max(map(len, shown.values()))
    best = study["rows"][study["best"]]
    for key, name in shown.items():
        mark = "  <- best" if study["rows"][key] == best else ""  # a tie marks every row that has it
        chose = chosen_setting(study.get("selection", {}).get(key))
        print(f"    {name:<{width}} {study['rows'][key]:6.2f}%{chose}{mark}")
    print_margins(study_margins(study))


def chosen_setting(choice: dict[str, Any] | None) -> str:
    """A row's setting as the table shows it: chosen by cross-validation (with its folds) or fixed."""
    if not choice or choice.get("chosen") is None:
        return ""
    how = f", {choice['folds']}-fold CV on the labels" if "folds" in choice else ""
    return f"  {choice_label(choice)}{how}"


def print_margins(m: dict[str, dict]) -> None:
    """The best MoCo row against the strongest row without pre-training and the best from-scratch row."""
    if "best_moco" not in m:
        return
    against = [f"{m[key]['margin']:+.2f} points over {what} ({m[key]['title']})"
               for key, what in (("over_no_pretraining", "the strongest row without pre-training"),
                                 ("over_scratch", "the best from scratch")) if key in m]
    if against:
        print(f"  best MoCo row ({m['best_moco']['title']}): " + "; ".join(against))


def main(argv: list[str] | None = None) -> int:
    argv = cli.argv_or_sys(argv)
    return cli.run(lambda: evaluate(parse_args(argv)), argv)


def evaluate(args: argparse.Namespace) -> int:
    """Check the checkpoint, config, labels and replicas, then run the command; the table when this process
    reports."""
    ckpt = find_checkpoint(args.ckpt)
    overrides = list(args.overrides)
    if args.labels is not None:
        overrides.append(f"eval.semisup.labels={args.labels}")
    cfg = eval_config(ckpt, args.config, overrides)
    if args.command == "semisup":
        use_labels_file(cfg, args.labels_file, args.labels)
    plan = plan_replicas(args.backend, args.cores)
    check_job(cfg, args.command, plan.world)
    data.check(cfg)
    out = cli.out_dir(Path(args.out) if args.out else default_out(ckpt, cfg))
    if plan.reports:
        out.mkdir(parents=True, exist_ok=True)
        print(f"moco_xla.eval {args.command}: {ckpt} on {plan.backend} x{plan.world} -> {out}", flush=True)
    start(plan.backend, plan.cores, Job(args.command, ckpt, cfg, str(out)))
    if plan.reports:
        print_table(args.command, out, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
