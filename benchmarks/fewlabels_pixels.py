"""The digits few-label study's raw-pixel rows on both inputs (``eval.semisup.pixel_input``), side by side.

The study in benchmarks/results/fewlabels-digits.json (``python -m moco_xla.bench fewlabels --config
digits_fewlabels``) ran its raw-pixel rows on the 16-px digits the network reads. This reruns those two
rows (raw-pixel label propagation + distilled, raw-pixel logistic regression) for every label count and
draw of that study, with its settings (2-fold selection on the labels), once on the pixels fed (16 px)
and once on the digits as stored (8x8), in one process one after another, and scores the study's best
MoCo row against the strongest row without pre-training over everything measured: the recorded
from-scratch rows and both inputs' raw-pixel rows.

    python benchmarks/fewlabels_pixels.py run      # the 18 studies (about 2 minutes each on 2 cores)
    python benchmarks/fewlabels_pixels.py report   # benchmarks/results/fewlabels-digits-pixels.md

The raw-pixel rows read no pre-trained weight (their students start from the config's seeded random
network), so they run without the study's checkpoint: the config is the one the study ran with.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "benchmarks" / "results" / "fewlabels-digits.json"
RESULTS = ROOT / "benchmarks" / "results" / "fewlabels-digits-pixels.json"
OUT = ROOT / "runs" / "fewlabels-digits-pixels"
ROWS = ("pixel_labelprop", "pixel_logistic")
INPUTS = ("fed", "stored")


def run() -> None:
    from moco_xla.bench.cli import machine
    from moco_xla.config import load_config
    from moco_xla.eval.command import Job
    from moco_xla.eval.fewlabels import run_semisup
    from moco_xla.report import MetricsWriter
    from moco_xla.runtime import make_runtime

    study = json.loads(STUDY.read_text())
    report = json.loads(RESULTS.read_text()) if RESULTS.exists() else {
        "command": "python benchmarks/fewlabels_pixels.py run", "machine": machine(), "config": study["config"],
        "overrides": study["overrides"], "studies": {}}
    rt = make_runtime("local")
    for n, by_draw in study["studies"].items():
        for draw in by_draw:
            for pixels in INPUTS:
                done = report["studies"].setdefault(n, {}).setdefault(draw, {})
                if pixels in done:
                    continue
                cfg = load_config(study["config"], [*study["overrides"], f"eval.semisup.labels={n}",
                                                    f"eval.semisup.seed={draw}", f"eval.semisup.rows={','.join(ROWS)}",
                                                    f"eval.semisup.pixel_input={pixels}"])
                out = OUT / f"labels-{n}-draw-{draw}-{pixels}"
                result = run_semisup(Job("semisup", "", cfg, str(out)), rt, MetricsWriter(out, enabled=False))
                s = result["semisup"][n]
                done[pixels] = {"rows": s["rows"], "pixel_size": s["pixel_size"],
                                "chosen": {k: v.get("chosen") for k, v in s["selection"].items()}}
                print(f"{n} labels, draw {draw}, {pixels} ({s['pixel_size']} px): {s['rows']}", flush=True)
                RESULTS.write_text(json.dumps(report, indent=1) + "\n")


def strongest(recorded: dict, measured: dict) -> tuple[str, float]:
    """(name, top-1) of the strongest row without pre-training: the study's own rows and both inputs' pixel rows."""
    from moco_xla.eval.rows import BY_KEY
    candidates = {f"{key} (recorded)": v for key, v in recorded["rows"].items() if BY_KEY[key].group != "moco"}
    for pixels, m in measured.items():
        candidates |= {f"{key} ({m['pixel_size']} px)": v for key, v in m["rows"].items()}
    name = max(candidates, key=candidates.get)
    return name, candidates[name]


def margins(report: dict, study: dict, n: str) -> list[tuple[float, str]]:
    """(margin, strongest row's name) per draw at ``n`` labels: the recorded best MoCo row against the
    strongest row without pre-training among everything measured."""
    from moco_xla.eval.rows import study_margins
    by_draw = report["studies"][n]
    out = []
    for d in sorted(by_draw, key=int):
        name, top1 = strongest(study["studies"][n][d], by_draw[d])
        out.append((study_margins(study["studies"][n][d])["best_moco"]["top1"] - top1, name))
    return out


def markdown(report: dict, study: dict) -> str:
    from moco_xla.eval.rows import study_margins
    lines = [f"Raw-pixel rows of the digits few-label study on both inputs (`{report['command']}`): "
             "top-1 % on the 540 test digits, each row's setting chosen by 2-fold cross-validation on the labels.",
             ""]
    for n, by_draw in report["studies"].items():
        draws = sorted(by_draw, key=int)
        recorded = study["studies"][n]
        lines += [f"**{n} labels**", "", "| row | " + " | ".join(f"draw {d}" for d in draws) + " | mean |",
                  "|---|" + "---:|" * (len(draws) + 1)]
        for key, name in (("pixel_labelprop", "raw-pixel label propagation + distilled"),
                          ("pixel_logistic", "raw-pixel logistic regression")):
            lines.append(row(f"{name}, as recorded (16 px)", [recorded[d]["rows"][key] for d in draws]))
            for pixels in INPUTS:
                size = by_draw[draws[0]][pixels]["pixel_size"]
                lines.append(row(f"{name}, rerun on the pixels {pixels} ({size} px)",
                                 [by_draw[d][pixels]["rows"][key] for d in draws]))
        best = [study_margins(recorded[d])["best_moco"] for d in draws]
        lines.append(row(f"best MoCo row, as recorded ({best[0]['title']})", [b["top1"] for b in best]))
        over = margins(report, study, n)
        lines += [row("**best MoCo row over the strongest row without pre-training, everything above**",
                      [m for m, _ in over], signed=True), "",
                  f"The strongest row without pre-training, by draw: {' / '.join(name for _, name in over)}.", ""]
    return "\n".join(lines)


def row(name: str, values: list[float], signed: bool = False) -> str:
    fmt = "{:+.2f}" if signed else "{:.2f}"
    cells = [fmt.format(v) for v in values] + [fmt.format(sum(values) / len(values))]
    return f"| {name} | " + " | ".join(cells) + " |"


def report() -> None:
    text = markdown(json.loads(RESULTS.read_text()), json.loads(STUDY.read_text()))
    RESULTS.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    {"run": run, "report": report}[sys.argv[1]]()
