"""Choosing a row's setting with the labelled images alone: stratified k-fold cross-validation.

A study with N labels may not look at more than N labels to choose its learning rates or its graph
(Oliver et al. 2018, "Realistic evaluation of deep semi-supervised learning algorithms": a
validation set larger than the labelled set flatters the method). So every candidate of a row's
grid (eval.semisup.select) is run once per fold, with the other folds as its labelled images and
the held-out fold as its test set; the unlabelled pool stays whole (the held-out images are in it,
unlabelled, as the test images are not). The best mean over the folds wins; a tie goes to the
earlier candidate. Every row with a grid gets a grid of the same size (equal budgets).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch


def label_folds(labels: torch.Tensor, folds: int, seed: int) -> list[torch.Tensor]:
    """``folds`` disjoint sets of positions in ``labels`` (the labelled images), stratified: each class's
    images, in a seeded order, are dealt to the folds in turn, continuing where the previous class stopped,
    so fold sizes differ by at most one and every class is spread evenly."""
    g = torch.Generator().manual_seed(seed)
    fold_of = torch.empty(len(labels), dtype=torch.long)
    dealt = 0
    for c in labels.unique().tolist():
        positions = (labels == c).nonzero().flatten()
        positions = positions[torch.randperm(len(positions), generator=g)]
        fold_of[positions] = (torch.arange(len(positions)) + dealt) % folds
        dealt += len(positions)
    return [(fold_of == f).nonzero().flatten() for f in range(folds)]


def with_setting(section: Any, dotted: str, value: Any) -> Any:
    """A copy of the dataclass ``section`` with ``dotted`` (e.g. "labelprop.k") set to ``value``."""
    head, _, rest = dotted.partition(".")
    if not rest:
        field_type = type(getattr(section, head))
        return dataclasses.replace(section, **{head: field_type(value)})
    return dataclasses.replace(section, **{head: with_setting(getattr(section, head), rest, value)})


@dataclass
class Choice:
    """What cross-validation chose for one row, and on what evidence (summary.json's ``selection``)."""

    setting: str            # the eval.semisup key
    grid: list              # the candidates, in order
    scores: list[float]     # each candidate's mean top-1 over the folds (percent)
    chosen: Any             # the best candidate
    folds: int
    fold_sizes: list[int]   # held-out labelled images per fold
    scored_by: str          # what a fold's score measures

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def cross_validate(setting: str, grid: list, folds: list[torch.Tensor], scored_by: str,
                   score: Callable[[Any, torch.Tensor], torch.Tensor]) -> Choice:
    """Every candidate of ``grid`` scored on every fold: ``score(candidate, held_out_positions)`` is that
    fold's top-1 as a device scalar; the scalars are read once, at the end."""
    per_fold = [[score(value, held) for held in folds] for value in grid]
    means = [float(torch.stack([s.reshape(()) for s in scores]).mean()) for scores in per_fold]  # one read
    best = max(range(len(grid)), key=lambda i: (means[i], -i))
    return Choice(setting, list(grid), means, grid[best], len(folds), [len(f) for f in folds], scored_by)


def choice_label(choice: dict[str, Any] | None) -> str:
    """A summary.json ``selection`` record as a table shows it: "probe_lr 3", or "lr 0.01 (fixed)"."""
    if not choice or choice.get("chosen") is None:
        return "-"
    name = choice["setting"].rsplit(".", 1)[-1]
    return f"{name} {choice['chosen']:g}" + ("" if "folds" in choice else " (fixed)")


def fixed(setting: str, value: Any) -> dict[str, Any]:
    """summary.json's record of a row that chooses nothing: the configured value, the same rule for MoCo's row
    and its baseline."""
    return {"setting": setting, "chosen": value, "scored_by": "fixed: the configured value, not selected"}
