"""PNG plots of a run, drawn from metrics.jsonl and summary.json (matplotlib, no display needed).

What a MoCo user looks at first: the loss against ln(K+1) (a collapsed run sits
on that line), kNN accuracy per epoch, the learning-rate schedule, throughput,
the linear probe's curve, and the few-label comparison as a bar chart. Figures
are made with ``matplotlib.figure.Figure`` (the Agg canvas, no pyplot state), so
drawing is safe in any process or thread.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .eval.rows import SEMISUP_ROWS, study_margins, study_titles

SIZE, DPI = (6.4, 4.0), 100  # 640 x 400 pixels

def plot_run(plots_dir: str | os.PathLike, records: list[dict[str, Any]], summary: dict[str, Any]) -> list[Path]:
    """Redraw into ``plots_dir`` every plot a run's records (metrics.jsonl) and summary support; returns the
    files written."""
    out = Path(plots_dir)
    epochs = _last_per_epoch([r for r in records if r.get("type") == "epoch"])
    steps = [r for r in records if r.get("type") == "step"]
    linear = _last_per_epoch([r for r in records if r.get("type") == "linear"])
    made = [
        loss_plot(epochs, steps, summary.get("uniform_loss"), out / "loss.png"),
        knn_plot({"MoCo (pooled backbone features)": epochs}, out / "knn.png"),
        series_plot(epochs, "lr", "learning rate", "learning rate", out / "lr.png"),
        series_plot(epochs, "images_per_s", "images / s", "throughput (all replicas)",
                    out / "throughput.png"),
        linear_plot(linear, out / "linear.png"),
        semisup_plot(summary.get("semisup") or {}, out / "semisup.png"),
    ]
    return [p for p in made if p is not None]


def _last_per_epoch(records: list[dict]) -> list[dict]:
    """One record per epoch (the latest: a resumed run rewrites the epochs after its checkpoint)."""
    by_epoch = {r["epoch"]: r for r in records if "epoch" in r}
    return [by_epoch[e] for e in sorted(by_epoch)]


def _figure(title: str, xlabel: str, ylabel: str, size: tuple[float, float] = SIZE) -> tuple[Figure, Any]:
    fig = Figure(figsize=size, dpi=DPI, layout="tight")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def loss_plot(epochs: list[dict], steps: list[dict], uniform: float | None, path: Path) -> Path | None:
    """Per-step losses (thin) and epoch means (dots) against epochs, with the collapse line."""
    if not epochs and not steps:
        return None
    fig, ax = _figure("MoCo loss", "epoch", "InfoNCE loss")
    per_epoch = epochs[-1]["step"] / epochs[-1]["epoch"] if epochs and epochs[-1].get("step") else None
    if steps and per_epoch:
        ax.plot([s["step"] / per_epoch for s in steps], [s["loss"] for s in steps], lw=0.8, alpha=0.5,
                label="logged steps")
    if epochs:
        ax.plot([e["epoch"] for e in epochs], [e.get("loss") for e in epochs], "o-", label="epoch mean")
    if uniform:
        ax.axhline(uniform, color="red", ls="--", lw=1, label="ln(K+1): uniform logits (collapse)")
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


def series_plot(epochs: list[dict], key: str, ylabel: str, title: str, path: Path) -> Path | None:
    """One epoch-record field against the epoch (skipped when no epoch has it)."""
    points = [(e["epoch"], e[key]) for e in epochs if e.get(key) is not None]
    if not points:
        return None
    fig, ax = _figure(title, "epoch", ylabel)
    ax.plot(*zip(*points), "o-")
    return _save(fig, path)


def knn_plot(runs: dict[str, list[dict]], path: Path, title: str = "kNN accuracy on the test set") -> Path | None:
    """Each run's kNN curve (epoch records with ``knn_top1``) and, dashed in the same colour, the same
    kNN on its raw centred pixels (``pixel_knn_top1``): has pre-training learned more than the input?"""
    curves = {name: (points, epochs) for name, epochs in runs.items()
              if (points := [(e["epoch"], e["knn_top1"]) for e in epochs if e.get("knn_top1") is not None])}
    if not curves:
        return None
    fig, ax = _figure(title, "epoch", "kNN top-1 (%)")
    for i, (name, (points, epochs)) in enumerate(curves.items()):
        ax.plot(*zip(*points), "o-", color=f"C{i}", label=name)
        pixels = next((e["pixel_knn_top1"] for e in reversed(epochs) if e.get("pixel_knn_top1") is not None), None)
        if pixels is not None:
            ax.axhline(pixels, color=f"C{i}", ls="--", lw=1, label=f"raw centred pixels ({pixels:.1f}%)")
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def linear_plot(records: list[dict], path: Path) -> Path | None:
    """The linear probe: training loss and test top-1 per probe epoch."""
    if not records:
        return None
    fig, ax = _figure("linear probe on frozen features", "probe epoch", "training loss")
    ax.plot([r["epoch"] for r in records], [r.get("loss") for r in records], color="C0", label="loss")
    evaluated = [(r["epoch"], r["top1"]) for r in records if r.get("top1") is not None]
    if evaluated:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evaluated), "o-", color="C1", label="test top-1")
        ax2.set_ylabel("test top-1 (%)")
        ax2.legend(loc="center right", fontsize="small")
    ax.legend(loc="upper right", fontsize="small")
    return _save(fig, path)


def semisup_plot(studies: dict[str, dict], path: Path) -> Path | None:
    """Test top-1 of every row of the few-label study: one horizontal bar per row and label count,
    rows top to bottom in the study's order (their names fit beside horizontal bars)."""
    studies = {k: v for k, v in studies.items() if isinstance(v, dict) and v.get("rows")}
    if not studies:
        return None
    counts = sorted(studies, key=int)
    rows = [r for r in SEMISUP_ROWS if any(r in studies[n]["rows"] for n in counts)]
    names = {k: v for n in reversed(counts) for k, v in study_titles(studies[n]).items()}  # raw pixels named
    height_in = max(SIZE[1], 0.2 + 0.45 * len(rows) * (1 + 0.25 * len(counts)))
    fig, ax = _figure("few labels: test top-1", "test top-1 (%)", "", (SIZE[0], height_in))
    ax.grid(False, axis="y")  # rows are categories: only the percent axis gets lines
    height = 0.8 / len(counts)
    for j, n in enumerate(counts):
        ys = [i + (j - (len(counts) - 1) / 2) * height for i in range(len(rows))]
        xs = [studies[n]["rows"].get(r) or 0.0 for r in rows]
        bars = ax.barh(ys, xs, height, label=f"{n} labels{_margins_note(study_margins(studies[n]))}")
        ax.bar_label(bars, fmt="%.1f", fontsize="x-small", padding=2)
    ax.set_yticks(range(len(rows)), [names[r] for r in rows], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.legend(loc="upper right", bbox_to_anchor=(1.0, -0.08), fontsize="small")  # long entries: leftwards
    return _save(fig, path)


def _margins_note(m: dict[str, dict]) -> str:
    """A legend entry's margins of the best MoCo row (eval/rows.py margins), e.g. ': best MoCo +1.5 vs
    no pre-training, +3.9 vs scratch'."""
    parts = [f"{m[key]['margin']:+.1f} vs {what}" for key, what in
             (("over_no_pretraining", "no pre-training"), ("over_scratch", "scratch")) if key in m]
    return f": best MoCo {', '.join(parts)}" if parts else ""
