"""The few-label study chooses every setting with its N labelled images alone (stratified k-fold
cross-validation), over grids of one size for every row, and records the evidence."""
from __future__ import annotations

import pytest
import torch

from eval_fns import tiny_checkpoint
from moco_xla.config import SemisupConfig, load_config
from moco_xla.errors import UserError
from moco_xla.eval import fewlabels
from moco_xla.eval.command import Job, eval_config
from moco_xla.eval.fewlabels import run_semisup
from moco_xla.eval.rows import BY_KEY, ROWS, cross_validation_runs, row_steps
from moco_xla.eval.select import cross_validate, label_folds, with_setting
from moco_xla.report import MetricsWriter
from moco_xla.runtime import make_runtime


def test_folds_are_disjoint_cover_the_labels_and_spread_every_class():
    labels = torch.arange(10).repeat_interleave(5)  # 50 labels, 5 per class
    folds = label_folds(labels, 3, seed=0)
    together = torch.cat(folds).sort().values
    assert torch.equal(together, torch.arange(50))  # disjoint and complete
    assert sorted(map(len, folds)) == [16, 17, 17]
    for f in folds:  # every class in every fold, 1 or 2 of its 5 images
        counts = torch.bincount(labels[f], minlength=10)
        assert counts.min() >= 1 and counts.max() <= 2
    assert [f.tolist() for f in label_folds(labels, 3, seed=0)] == [f.tolist() for f in folds]
    assert [f.tolist() for f in label_folds(labels, 3, seed=1)] != [f.tolist() for f in folds]


def test_a_setting_is_replaced_in_a_copy_at_any_depth():
    s = SemisupConfig()
    t = with_setting(with_setting(s, "labelprop.pixel_k", 20), "finetune_lr", 0.03)
    assert (t.labelprop.pixel_k, t.finetune_lr) == (20, 0.03)
    assert (s.labelprop.pixel_k, s.finetune_lr) == (5, 0.01)  # the study's own config untouched
    assert isinstance(with_setting(s, "labelprop.k", 10.0).labelprop.k, int)


def test_cross_validation_picks_the_best_mean_over_the_folds_and_breaks_ties_early():
    folds = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    table = {(1, 0): 50.0, (1, 2): 70.0, (2, 0): 80.0, (2, 2): 60.0, (3, 0): 90.0, (3, 2): 10.0}
    seen = []

    def score(value, held):
        seen.append((value, held.tolist()))
        return torch.tensor(table[(value, int(held[0]))])

    choice = cross_validate("lr", [1, 2, 3], folds, "top-1", score)
    assert choice.scores == [60.0, 70.0, 50.0] and choice.chosen == 2
    assert len(seen) == 6 and choice.fold_sizes == [2, 2] and choice.folds == 2
    tie = cross_validate("lr", [1, 2], folds, "top-1", lambda v, held: torch.tensor(5.0))
    assert tie.chosen == 1


def test_every_row_with_a_setting_has_a_grid_and_paired_rows_get_the_same_budget():
    s = SemisupConfig()
    for row in ROWS:
        assert bool(row.setting) == bool(row.grid), row
        if row.grid:
            assert len(getattr(s.select, row.grid)) == 3
    # each MoCo row and its counterpart without pre-training search the same number of candidates
    for moco, base in (("moco_finetune", "supervised_scratch"), ("moco_probe", "random_probe"),
                       ("moco_labelprop", "pixel_labelprop"), ("moco_distill", "scratch_distill")):
        a, b = BY_KEY[moco], BY_KEY[base]
        assert len(getattr(s.select, a.grid, [])) == len(getattr(s.select, b.grid, [])), (moco, base)
    assert cross_validation_runs(BY_KEY["moco_finetune"], s) == 9
    assert row_steps(BY_KEY["supervised_scratch"], s) == s.steps * 10
    assert cross_validation_runs(BY_KEY["moco_labelprop"], s) == 0  # scored on propagated labels, no training


def test_grids_of_different_sizes_are_refused_in_one_line():
    with pytest.raises(UserError, match="grids must have one size.*lr 2"):
        load_config("digits", ["eval.semisup.select.lr=[0.01,0.1]"])
    with pytest.raises(UserError, match="select.folds.*must be 0"):
        load_config("digits", ["eval.semisup.select.folds=1"])


def test_a_study_records_what_each_row_chose_and_on_what_evidence(tmp_path, monkeypatch):
    """The chosen value is the one the row then runs with, and the folds never include the test images."""
    ckpt, _ = tiny_checkpoint(tmp_path)
    cfg = eval_config(str(ckpt), None, [
        "eval.semisup.labels=20", "eval.semisup.steps=2", "eval.semisup.rows=moco_probe,pixel_labelprop,pixel_logistic",
        "eval.semisup.distill.steps=1", "eval.semisup.distill.batch_size=32", "eval.semisup.select.folds=2",
        "eval.semisup.select.probe_lr=[0.5,50]", "eval.semisup.select.finetune_lr=[0.01,0.02]",
        "eval.semisup.select.lr=[0.01,0.02]", "eval.semisup.select.labelprop_k=[3,6]",
        "eval.semisup.select.pixel_c=[0.01,1]", "data.workers=0"])
    ran = []
    real_run_row = fewlabels.run_row

    def spy(row, st, encoders, trained):
        ran.append((row.key, st.split.scored_on, len(st.split.picked), st.cfg.eval.semisup.probe_lr))
        return real_run_row(row, st, encoders, trained)

    monkeypatch.setattr(fewlabels, "run_row", spy)
    result = run_semisup(Job("semisup", str(ckpt), cfg, str(tmp_path / "out")), make_runtime("local"),
                         MetricsWriter(tmp_path / "out", enabled=False))
    study = result["semisup"]["20"]
    probe = study["selection"]["moco_probe"]
    assert probe["setting"] == "probe_lr" and probe["grid"] == [0.5, 50] and probe["folds"] == 2
    assert probe["fold_sizes"] == [10, 10] and probe["chosen"] in (0.5, 50) and len(probe["scores"]) == 2
    assert study["selection"]["pixel_labelprop"]["scored_by"] == "propagated labels on the held-out fold"
    assert study["selection"]["pixel_logistic"]["chosen"] in (0.01, 1)
    probe_runs = [r for r in ran if r[0] == "moco_probe"]
    assert [r[1] for r in probe_runs[:4]] == ["a held-out fold of the labels"] * 4  # 2 candidates x 2 folds
    assert all(r[2] == 10 for r in probe_runs[:4])  # trained on the other fold only
    assert probe_runs[4][1] == "test" and probe_runs[4][2] == 20 and probe_runs[4][3] == probe["chosen"]
    assert study["select"]["folds"] == 2
