"""The few-label study's row catalogue: every way the study uses its N labelled images, in one table.

A row names the function that trains it (``kind``), the backbone it starts from, the setting that
is its learning rate, the row whose model teaches it (distilled rows), the graph its labels spread
over (label propagation), its step budget, whether it sees the raw pixels, and which group of the
report it belongs to: pre-trained (MoCo's checkpoint), from scratch (a random network trained on the
labelled images) or another row without pre-training (raw pixels, a random encoder). Adding a row
is adding a line here (and, for a new kind, one function in fewlabels.py). The order is the
report's order; a teacher comes before its students, so one pass over the selected rows trains
every teacher before it is needed.
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
    pixels: str = "never"  # uses the raw pixels: "always", "never" or "pixel_weight" (when labelprop.pixel_weight > 0)
    mixed_title: str = ""  # pixels "pixel_weight": the name when it does ({w}: the pixel weight)
    group: str = "moco"    # the report's margins: "moco" (pre-trained), "scratch" or "other" (no pre-training)
    setting: str = ""      # the eval.semisup key cross-validation chooses for it (select.py; "": fixed)
    grid: str = ""         # its candidates: a list of eval.semisup.select


ROWS = (
    Row("moco_probe", "MoCo linear probe (frozen)", "probe", "moco", "probe_lr", setting="probe_lr", grid="probe_lr"),
    Row("moco_finetune", "MoCo fine-tuned", "finetune", "moco", "finetune_lr", setting="finetune_lr",
        grid="finetune_lr"),
    Row("moco_distill", "MoCo fine-tuned + distilled", "distill", "moco", "distill.lr", teacher="moco_finetune",
        budget="distill"),
    Row("moco_labelprop", "MoCo label propagation + distilled", "labelprop", "moco", "distill.lr", graph="moco",
        budget="distill", pixels="pixel_weight",
        mixed_title="MoCo + {w:g} x raw pixels label propagation + distilled", setting="labelprop.k",
        grid="labelprop_k"),
    Row("supervised_scratch", "supervised from scratch", "finetune", "random", "lr", group="scratch", setting="lr",
        grid="lr"),
    Row("scratch_distill", "from scratch + distilled", "distill", "random", "distill.scratch_lr",
        teacher="supervised_scratch", budget="distill", group="scratch"),
    Row("pixel_labelprop", "raw-pixel label propagation + distilled", "labelprop", "random",
        "distill.scratch_lr", graph="pixels", budget="distill", pixels="always", group="other",
        setting="labelprop.pixel_k", grid="labelprop_k"),
    Row("pixel_logistic", "raw-pixel logistic regression", "logistic", budget="none", pixels="always",
        group="other", setting="pixel_c", grid="pixel_c"),
    Row("random_probe", "random-init encoder probe", "probe", "random", "probe_lr", group="other",
        setting="probe_lr", grid="probe_lr"),
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


def uses_pixels(key: str, pixel_weight: float = 0.0) -> bool:
    """Whether the row sees the raw pixels (its graph mixes them in at eval.semisup.labelprop.pixel_weight)."""
    row = BY_KEY[key]
    return row.pixels == "always" or (row.pixels == "pixel_weight" and pixel_weight > 0)


def title(key: str, pixel_weight: float = 0.0) -> str:
    """The row's name in the table, the plot and summary.json; a row that mixes the raw pixels in says so."""
    row = BY_KEY[key]
    if row.pixels == "pixel_weight" and pixel_weight > 0:
        return row.mixed_title.format(w=pixel_weight)
    return row.title


def study_titles(study: dict) -> dict[str, str]:
    """A summary.json study's row names in the catalogue's order: its own ``titles``, else (older summaries)
    the names its pixel weight gives."""
    pixel_weight = study.get("labelprop", {}).get("pixel_weight", 0.0)
    return {row.key: study.get("titles", {}).get(row.key) or title(row.key, pixel_weight)
            for row in ROWS if row.key in study["rows"]}


def margins(values: dict[str, float], titles: dict[str, str]) -> dict[str, dict]:
    """The best pre-trained (MoCo) row's margin in top-1 points over the strongest row without pre-training
    of any kind (raw pixels and from-scratch rows included) and over the best from-scratch row; a group
    with no row in ``values`` is left out."""
    def best(groups: tuple[str, ...]) -> dict | None:
        keys = [key for key in values if key in BY_KEY and BY_KEY[key].group in groups]
        if not keys:
            return None
        key = max(keys, key=values.get)
        return {"row": key, "title": titles[key], "top1": values[key]}

    moco = best(("moco",))
    if moco is None:
        return {}
    out = {"best_moco": moco}
    for name, groups in (("over_no_pretraining", ("scratch", "other")), ("over_scratch", ("scratch",))):
        other = best(groups)
        if other is not None:
            out[name] = {**other, "margin": moco["top1"] - other["top1"]}
    return out


def row_lr(row: Row, semisup) -> float:
    """The value of the row's learning-rate setting in eval.semisup (``semisup``: a SemisupConfig)."""
    return float(setting_value(semisup, row.lr))


def setting_value(semisup, dotted: str):
    """The value of the eval.semisup key ``dotted`` (e.g. "labelprop.k") in ``semisup``."""
    value = semisup
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def row_steps(row: Row, semisup) -> int:
    """The progress ticks the row makes: its optimisation steps (none for the logistic regression), and
    those of its cross-validation runs (trained rows: one per fold and candidate)."""
    steps = {"steps": semisup.steps, "distill": semisup.distill.steps, "none": 0}[row.budget]
    return steps * (1 + cross_validation_runs(row, semisup))


def cross_validation_runs(row: Row, semisup) -> int:
    """How many times select.py trains the row to choose its setting (label propagation is scored on its
    propagated labels, the logistic regression on the host: no training steps)."""
    if not row.grid or semisup.select.folds == 0 or row.kind not in ("probe", "finetune"):
        return 0
    return semisup.select.folds * len(getattr(semisup.select, row.grid))


def study_margins(study: dict) -> dict[str, dict]:
    """A summary.json study's margins: its own, else (older summaries) computed from its rows."""
    return study.get("margins") or margins(study["rows"], study_titles(study))
