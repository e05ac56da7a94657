"""The few-label study's row catalogue: every way the study uses its N labelled images, in one table.

A row names the function that trains it (``kind``), the backbone it starts from, the setting that
is its learning rate, the row whose model teaches it (distilled rows), the graph its labels spread
over (label propagation) and its step budget. Adding a row is adding a line here (and, for a new
kind, one function in fewlabels.py). The order is the report's order; a teacher comes before its
students, so one pass over the selected rows trains every teacher before it is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

KINDS = ("probe", "finetune", "distill", "labelprop", "logistic")


@dataclass(frozen=True)
class Row:
    key: str              # summary.json's name of the row
    title: str            # the printed table's and the plot's name
    kind: str             # probe | finetune | distill | labelprop | logistic (a function in fewlabels.py)
    start: str = ""       # the backbone it starts from: "moco" (the checkpoint's) or "random" (train.seed)
    lr: str = ""          # its learning rate: a key of eval.semisup ("finetune_lr", "distill.lr", ...)
    teacher: str = ""     # distill: the row whose trained model teaches it
    graph: str = ""       # labelprop: "moco" (the encoder's features) or "pixels"
    budget: str = "steps"  # progress: "steps" (eval.semisup.steps), "distill" (distill.steps) or "none"


ROWS = (
    Row("moco_probe", "MoCo linear probe (frozen)", "probe", "moco", "probe_lr"),
    Row("moco_finetune", "MoCo fine-tuned", "finetune", "moco", "finetune_lr"),
    Row("moco_distill", "MoCo fine-tuned + distilled", "distill", "moco", "distill.lr", teacher="moco_finetune",
        budget="distill"),
    Row("moco_labelprop", "MoCo label propagation + distilled", "labelprop", "moco", "distill.lr", graph="moco",
        budget="distill"),
    Row("supervised_scratch", "supervised from scratch", "finetune", "random", "lr"),
    Row("scratch_distill", "from scratch + distilled", "distill", "random", "distill.scratch_lr",
        teacher="supervised_scratch", budget="distill"),
    Row("pixel_labelprop", "raw-pixel label propagation + distilled", "labelprop", "random",
        "distill.scratch_lr", graph="pixels", budget="distill"),
    Row("pixel_logistic", "raw-pixel logistic regression", "logistic", budget="none"),
    Row("random_probe", "random-init encoder probe", "probe", "random", "probe_lr"),
)
BY_KEY = {row.key: row for row in ROWS}
SEMISUP_ROWS = {row.key: row.title for row in ROWS}  # key -> title, in the report's order


def selected_rows(text: str) -> list[Row]:
    """eval.semisup.rows ("all" or comma-separated row keys) as the rows to run, in the table's order; a
    distilled row brings its teacher's row (the teacher is trained there)."""
    if text.strip() == "all":
        return list(ROWS)
    asked = {key.strip() for key in text.split(",") if key.strip()}
    unknown = sorted(asked - set(BY_KEY))
    if unknown or not asked:
        raise UserError(f"eval.semisup.rows has {', '.join(unknown) or 'no row'}; valid: all or a comma-separated "
                        f"list of {', '.join(BY_KEY)}")
    asked |= {BY_KEY[key].teacher for key in asked if BY_KEY[key].teacher}
    return [row for row in ROWS if row.key in asked]


def title(key: str, pixel_weight: float = 0.0) -> str:
    """The row's printed name; MoCo's label propagation on a graph joined with the raw pixels says so."""
    if key == "moco_labelprop" and pixel_weight:
        return f"MoCo + {pixel_weight:g} pixels label propagation + distilled"
    return BY_KEY[key].title


def row_lr(row: Row, semisup) -> float:
    """The value of the row's learning-rate setting in eval.semisup (``semisup``: a SemisupConfig)."""
    value = semisup
    for part in row.lr.split("."):
        value = getattr(value, part)
    return float(value)


def row_steps(row: Row, semisup) -> int:
    """The progress ticks the row makes: its optimisation steps (none for the logistic regression)."""
    return {"steps": semisup.steps, "distill": semisup.distill.steps, "none": 0}[row.budget]
