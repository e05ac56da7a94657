"""The command: flags, the run over backends, the printed table, bench.json."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from .. import cli
from ..errors import UserError
from .loader import loader_rows
from .official import comparison_for, run_comparison
from .steps import Workload, run_in_child, shuffle_count_bytes, workload_for

DESCRIPTION = "``python -m moco_xla.bench``: how close MoCo runs to the hardware, as ratios that travel."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.parser("python -m moco_xla.bench", DESCRIPTION)
    p.add_argument("--backend", default="auto",
                   help="comma-separated: cpu, xla, cuda, auto (default auto: TPU, else CUDA, else CPU)")
    p.add_argument("--quick", action="store_true", help="tiny model, a few steps (seconds; for tests)")
    p.add_argument("--out", default="bench", help="directory for bench.json (default: ./bench)")
    p.add_argument("--arch", default=None, help="override the encoder (resnet18/34/50, small_resnet)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="per-replica batch")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round")
    p.add_argument("--precision", default=None, help="auto | fp32 | bf16 | fp16")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: one per core; 1 is steadier on a busy host)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds; the best counts")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the encoders (train.compile; cpu and cuda; warm-up then includes compiling)")
    p.add_argument("--official", default="auto", choices=("auto", "on", "off"),
                   help="side by side with the official facebookresearch/moco builder under DDP on cpu "
                        "(2 gloo processes) and cuda (every GPU); auto = on unless --quick")
    p.add_argument("--official-rounds", type=int, default=None, help="interleaved rounds of the side by side")
    p.add_argument("--loader", default="auto", choices=("auto", "digits", "off"),
                   help="input pipeline rows: auto = benchmarks/loader_bench.py where present (minutes), "
                        "digits = the in-memory quickstart loader (seconds)")
    p.add_argument("--pipelines", action="store_true",
                   help="instead of the steps: host CPU per image of MoCo v2's two views, official pipeline vs "
                        "moco_xla's vs decoding alone (one thread; <out>/pipelines.json and .md; minutes, seconds with --quick)")
    p.add_argument("--pipeline-limits", action="store_true",
                   help="instead of the steps: the faster decodes and resizes the pipeline does not use, "
                        "timed beside its own (<out>/pipeline-limits.json and .md; a minute, seconds with --quick)")
    return p.parse_args(argv)


def resolve_backends(spec: str) -> list[str]:
    from ..runtime import available_replicas, resolve_backend, xla_installed
    names = [b.strip() for b in spec.split(",") if b.strip()]
    valid = ("auto", "cpu", "xla", "cuda")
    for b in names:
        if b not in valid:
            raise UserError(f"--backend {b!r}; valid: {', '.join(valid)} (comma-separated)")
    out = []
    for b in names:
        b = resolve_backend(b)
        if b == "xla" and not xla_installed():
            raise UserError("--backend xla needs torch_xla (pip install torch_xla)")
        if b == "cuda" and available_replicas("cuda") == 0:
            raise UserError("--backend cuda found no CUDA GPU; valid here: cpu" +
                            (", xla" if xla_installed() else ""))
        if b not in out:
            out.append(b)
    return out or ["cpu"]


def apply_overrides(w: Workload, args: argparse.Namespace) -> Workload:
    from ..models import ARCHS
    if args.arch is not None and args.arch not in ARCHS:
        raise UserError(f"--arch {args.arch!r}; valid: {', '.join(ARCHS)}")
    for flag, value, low in (("--image-size", args.image_size, 8), ("--batch", args.batch, 2),
                             ("--steps", args.steps, 1), ("--threads", args.threads, 1),
                             ("--rounds", args.rounds, 1)):
        if value is not None and value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    if args.precision is not None and args.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"--precision {args.precision!r}; valid: auto, fp32, bf16, fp16")
    changes = {"arch": args.arch, "image_size": args.image_size, "batch": args.batch, "steps": args.steps,
               "precision": args.precision, "threads": args.threads, "rounds": args.rounds,
               "compile": args.compile or None}
    w = dataclasses.replace(w, **{k: v for k, v in changes.items() if v is not None})
    if w.K % w.batch:
        w = dataclasses.replace(w, K=max(w.batch, w.K // w.batch * w.batch))
    if w.batch % w.bn_splits:
        w = dataclasses.replace(w, bn_splits=1)
    return w


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..runtime import available_replicas, resolve_precision
    backends = resolve_backends(args.backend)
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick, "backends": {}, "workloads": {}}
    for b in backends:
        w = apply_overrides(workload_for(b, args.quick), args)
        resolve_precision(b, w.precision)  # UserError for e.g. fp16 on XLA, before a process starts
        if w.compile and b == "xla":
            raise UserError("--compile is for the cpu and cuda backends (XLA compiles the step graph itself)")
        results["workloads"][b] = dataclasses.asdict(w)
        print(f"bench: {b} ({w.arch}, {w.image_size} px, batch {w.batch}) ...", flush=True)
        results["backends"][b] = run_in_child(b, w)
    if args.official_rounds is not None and args.official_rounds < 1:
        raise UserError(f"--official-rounds must be >= 1, got {args.official_rounds}")
    results["official"] = {}
    if args.official == "on" or (args.official == "auto" and not args.quick):
        for b in backends:
            if b in ("cpu", "cuda"):
                c = comparison_for(b, args.quick, available_replicas("cuda") if b == "cuda" else 0)
                if args.official_rounds:
                    c = dataclasses.replace(c, rounds=args.official_rounds)
                results["workloads"][f"official-{b}"] = {**dataclasses.asdict(c.workload), "world": c.world}
                print(f"bench: {b} side by side with the official code ({c.world} processes) ...", flush=True)
                results["official"][b] = run_comparison(b, c)
    ref = "xla" if "xla" in backends else backends[0]  # the shuffle counts match its lowered graph
    w0 = Workload(**results["workloads"][ref])
    prec = results["backends"][ref].get("precision", "fp32")
    results["loader"] = loader_rows(args.quick, args.loader)
    results["shuffle"] = merge_shuffle(shuffle_count_bytes(w0, prec),
                                       results["backends"].get("xla", {}).get("shuffle_hlo", []))
    loader_ips = max((r.get("images_per_s") or 0 for r in results["loader"]), default=0)
    for r in results["backends"].values():
        if "moco_images_per_s" in r:
            r["loader_over_step"] = loader_ips / r["moco_images_per_s"]
    return results


def merge_shuffle(count: list[dict], hlo: list[dict]) -> list[dict]:
    by_key = {(r["mode"], r["world"]): r for r in hlo}
    return [{**r, **{k: v for k, v in by_key.get((r["mode"], r["world"]), {}).items()
                     if k in ("hlo_bytes", "ops", "key_dtype")}} for r in count]


def cpu_model() -> str:
    """The processor's name (/proc/cpuinfo's "model name" on Linux), with its family, model and widest
    vector unit where the file gives them (clouds mask names: "AMD EPYC" is several generations): the
    same command runs at another speed, and with other float rounding, on another CPU model."""
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        return platform.processor() or "unknown"
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    name = fields.get("model name") or platform.processor() or "unknown"
    flags = fields.get("flags", "").split()
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    detail = [f"family {fields['cpu family']} model {fields['model']}" if "cpu family" in fields else None, vector]
    detail = [d for d in detail if d]
    return f"{name} ({', '.join(detail)})" if detail else name


def machine() -> dict[str, Any]:
    info = {"platform": platform.platform(), "cpu": cpu_model(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "torch": torch.__version__}
    if importlib.util.find_spec("torch_xla") is not None:
        from importlib.metadata import version
        info["torch_xla"] = version("torch_xla")
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def table(results: dict[str, Any]) -> str:
    """The printed summary: one block per backend, then the shuffle bytes."""
    lines = []
    for b, r in results["backends"].items():
        if "error" in r:
            lines.append(f"{b:<5} failed: {r['error']}")
            continue
        w = results["workloads"][b]
        lines.append(f"{b:<5} {r['device']}  {w['arch']} {w['image_size']} px  batch {w['batch']}  {r['precision']}")
        lines.append(f"      MoCo {r['moco_images_per_s']:.1f} img/s  supervised {r['supervised_images_per_s']:.1f} "
                     f"img/s  ratio {r['ratio']:.3f} (goal >= 0.70; measured limit {r['ratio_limit']:.3f}, "
                     f"efficiency {r['efficiency']:.2f})")
        if b != "cuda":
            lines.append(f"      by this process's CPU time: ratio {r['cpu_time_ratio']:.3f}, "
                         f"limit {r['cpu_time_ratio_limit']:.3f}")
        if r["compiles_after_warmup"] is not None:
            lines.append(f"      after warm-up: {r['compiles_after_warmup']} compilations, "
                         f"{r['fallback_ops_after_warmup']} fallback ops, {r['transfers_after_warmup']} host reads")
        dev = r.get("peak_device_bytes")
        lines.append(f"      peak host RSS {r['peak_host_rss_bytes'] / 2**20:.0f} MiB"
                     + (f", device {dev / 2**20:.0f} MiB" if dev else "")
                     + f"; loader/step images/s {r.get('loader_over_step', 0):.2f}")
    for b, r in results.get("official", {}).items():
        lines.append(official_line(b, r, results["workloads"].get(f"official-{b}", {})))
    for r in results["loader"]:
        lines.append(f"loader {r.get('source', '?')}, {r.get('workers', '?')} workers: "
                     f"{r.get('images_per_s', 0):.0f} img/s")
    for r in results["shuffle"]:
        hlo = f"  (HLO {r['hlo_bytes'] / 2**20:.2f} MiB)" if "hlo_bytes" in r else ""
        lines.append(f"shuffle {r['mode']:<10} x{r['world']:<3} {r['count_bytes'] / 2**20:8.2f} MiB/step/replica{hlo}")
    return "\n".join(lines)


def official_line(backend: str, r: dict[str, Any], w: dict[str, Any]) -> str:
    """The side-by-side row: moco_xla against the official builder under DDP, as a speed ratio."""
    if "error" in r:
        return f"{backend:<5} side by side failed: {r['error']}"
    return (f"{backend:<5} vs official facebookresearch/moco under DDP ({r['world']} x {r['device']}, "
            f"{w.get('arch')} {w.get('image_size')} px, batch {w.get('batch')}/replica, {r['precision']}): "
            f"moco_xla {r['moco_xla_images_per_s_per_replica']:.1f} img/s/replica, official "
            f"{r['official_images_per_s_per_replica']:.1f}: ratio {r['ratio']:.3f} (goal >= 1.10; median of "
            f"{r['rounds']} interleaved rounds; by CPU time {r['cpu_time_ratio']:.3f}); overlapped all-reduce "
            f"{r['overlap_over_flat']:.3f}x the flat one after backward")


def main(argv: list[str] | None = None) -> int:
    argv = cli.argv_or_sys(argv)
    if argv[:1] == ["fewlabels"]:  # the few-label study end to end (bench/fewlabels.py)
        from . import fewlabels
        return fewlabels.main(argv[1:])
    if argv[:1] == ["replicas"]:  # N replicas against one at the same global batch (bench/replicas.py)
        from . import replicas
        return replicas.main(argv[1:])
    return cli.run(lambda: bench(parse_args(argv)), argv)


def bench(args: argparse.Namespace) -> int:
    """The step-time rows (or ``--pipelines``) to <out>; 1 when a backend's row failed."""
    out = cli.out_dir(Path(args.out))
    if args.pipelines:
        return run_pipelines(args.quick, out)
    if args.pipeline_limits:
        return run_pipeline_limits(args.quick, out)
    results = run(args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"bench.json in {out}")
    failed = [r for part in ("backends", "official") for r in results[part].values() if "error" in r]
    return 1 if failed else 0


def run_pipeline_limits(quick: bool, out: Path) -> int:
    """``--pipeline-limits``: the paths not taken, to <out>/pipeline-limits.json and its markdown."""
    from . import pipeline_limits
    results = {"machine": machine(), "quick": quick, **pipeline_limits.run(quick)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline-limits.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "pipeline-limits.md").write_text(pipeline_limits.table(results) + "\n")
    print(pipeline_limits.table(results))
    print(f"pipeline-limits.json and .md in {out}")
    return 0


def run_pipelines(quick: bool, out: Path) -> int:
    """``--pipelines``: the input-pipeline comparison alone, to <out>/pipelines.json and its markdown."""
    from . import pipelines
    results = {"machine": machine(), "quick": quick, **pipelines.run(quick)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipelines.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "pipelines.md").write_text(pipelines.markdown(results) + "\n")
    print(pipelines.table(results))
    print(f"pipelines.json and .md in {out}")
    return 0

