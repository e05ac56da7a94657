"""The few-label study's seams: its one row catalogue, and one read of the checkpoint per study."""
from __future__ import annotations

from eval_fns import SMALL_SELECT, tiny_checkpoint
from moco_xla import checkpoint
from moco_xla.config import SemisupConfig
from moco_xla import plots
from moco_xla.eval.command import Job, eval_config, print_study, print_table
from moco_xla.eval.fewlabels import run_semisup
from moco_xla.eval.rows import (BY_KEY, KINDS, ROWS, SEMISUP_ROWS, margins, row_lr, row_steps, selected_rows, title,
                                uses_pixels)
from moco_xla.report import MetricsWriter, write_summary
from moco_xla.runtime import make_runtime


def test_every_distilled_row_names_a_teacher_that_exists_and_comes_before_it():
    order = [row.key for row in ROWS]
    assert len(set(order)) == len(order) == len(SEMISUP_ROWS) == 9
    for i, row in enumerate(ROWS):
        assert row.kind in KINDS, row
        if row.kind == "distill":
            teacher = BY_KEY[row.teacher]
            assert teacher.kind == "finetune" and order.index(row.teacher) < i, row
            assert teacher.start == row.start, row  # a student starts where its teacher did
        else:
            assert not row.teacher, row
        assert (row.kind == "labelprop") == bool(row.graph), row
        assert (row.kind == "logistic") == (not row.start and not row.lr), row


def test_every_row_reads_its_own_learning_rate_and_step_budget():
    s = SemisupConfig(probe_lr=1.5, finetune_lr=0.02, lr=0.07, steps=11)
    s.distill.lr, s.distill.scratch_lr, s.distill.steps = 0.3, 0.4, 13
    lrs = {row.key: row_lr(row, s) for row in ROWS if row.lr}
    assert lrs == {"moco_probe": 1.5, "random_probe": 1.5, "moco_finetune": 0.02, "supervised_scratch": 0.07,
                   "moco_distill": 0.3, "moco_labelprop": 0.3, "scratch_distill": 0.4, "pixel_labelprop": 0.4}
    s.select.folds = 0  # no cross-validation runs (their steps: test_fewlabels_select)
    steps = {row.key: row_steps(row, s) for row in ROWS}
    assert steps["pixel_logistic"] == 0 and steps["moco_finetune"] == 11 and steps["scratch_distill"] == 13
    assert [r.key for r in selected_rows("scratch_distill")] == ["supervised_scratch", "scratch_distill"]
    assert title("moco_labelprop", 0.5) == "MoCo + 0.5 x raw pixels label propagation + distilled"
    assert title("moco_labelprop") == SEMISUP_ROWS["moco_labelprop"]


def test_every_row_that_sees_the_raw_pixels_says_so_in_its_name():
    for weight in (0.0, 0.5):
        for row in ROWS:
            assert uses_pixels(row.key, weight) == ("raw pixel" in title(row.key, weight).replace("-", " ")), row
    assert uses_pixels("moco_labelprop", 0.5) and not uses_pixels("moco_labelprop", 0.0)
    assert uses_pixels("pixel_logistic") and uses_pixels("pixel_labelprop") and not uses_pixels("moco_finetune")


STUDY = {"moco_probe": 90.0, "moco_finetune": 93.0, "moco_distill": 94.5, "moco_labelprop": 97.0,
         "supervised_scratch": 91.0, "scratch_distill": 92.5, "pixel_labelprop": 95.5, "pixel_logistic": 85.0,
         "random_probe": 60.0}


def test_margins_are_over_the_strongest_row_without_pretraining_and_over_scratch():
    titles = {key: title(key, 0.5) for key in STUDY}
    m = margins(STUDY, titles)
    assert m["best_moco"]["row"] == "moco_labelprop" and "raw pixels" in m["best_moco"]["title"]
    assert m["over_no_pretraining"]["row"] == "pixel_labelprop"  # raw pixels count as no pre-training
    assert m["over_no_pretraining"]["margin"] == 1.5
    assert m["over_scratch"]["row"] == "scratch_distill" and m["over_scratch"]["margin"] == 4.5
    scratch_wins = {**STUDY, "supervised_scratch": 96.0}
    assert margins(scratch_wins, titles)["over_no_pretraining"]["row"] == "supervised_scratch"
    assert set(margins({"moco_probe": 90.0, "pixel_logistic": 91.0}, titles)) == {"best_moco", "over_no_pretraining"}
    assert margins({"supervised_scratch": 90.0}, titles) == {}


def test_table_and_plot_show_the_margins_and_name_raw_pixels(tmp_path, capsys, monkeypatch):
    study = {"labels": 100, "per_class": 10, "seed": 2, "labels_file": "", "test_images": 500,
             "labelprop": {"pixel_weight": 0.5}, "rows": STUDY, "best": "moco_labelprop"}
    print_study(study)  # an older summary: no titles, no margins stored; the same names and margins
    printed = capsys.readouterr().out
    assert "MoCo + 0.5 x raw pixels label propagation + distilled  97.00%  <- best" in printed
    assert "+1.50 points over the strongest row without pre-training (raw-pixel label propagation" in printed
    assert "+4.50 points over the best from scratch (from scratch + distilled)" in printed
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    plots.semisup_plot({"100": study}, tmp_path / "semisup.png")
    ax = drawn[0].axes[0]
    assert "MoCo + 0.5 x raw pixels label propagation + distilled" in [t.get_text() for t in ax.get_yticklabels()]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "100 labels: best MoCo +1.5 vs no pre-training, +4.5 vs scratch"]


def test_a_study_reads_the_checkpoint_once_for_all_its_rows(tmp_path, monkeypatch, capsys):
    """Two rows start from the pre-trained encoder and one graph is built on it: one read of the file."""
    ckpt, _ = tiny_checkpoint(tmp_path)
    reads = []
    real_read = checkpoint.read_bytes

    def counted(path):
        reads.append(str(path))
        return real_read(path)

    cfg = eval_config(str(ckpt), None, [
        "eval.semisup.labels=20", "eval.semisup.steps=1", "eval.semisup.distill.steps=1",
        "eval.semisup.distill.batch_size=32", "eval.semisup.rows=moco_probe,moco_labelprop", *SMALL_SELECT])
    monkeypatch.setattr(checkpoint, "read_bytes", counted)
    job = Job("semisup", str(ckpt), cfg, str(tmp_path / "out"))
    result = run_semisup(job, make_runtime("local"), MetricsWriter(tmp_path / "out", enabled=False))
    assert reads == [str(ckpt)]
    rows = result["semisup"]["20"]["rows"]
    assert list(rows) == ["moco_probe", "moco_labelprop"]
    assert all(0.0 <= v <= 100.0 for v in rows.values())
    (tmp_path / "out").mkdir()
    write_summary(tmp_path / "out", result)
    print_table("semisup", tmp_path / "out", cfg)
    printed = capsys.readouterr().out
    assert all(SEMISUP_ROWS[key] in printed for key in rows) or "raw pixels" in printed
    study = result["semisup"]["20"]
    assert study["margins"]["best_moco"]["row"] in rows and set(study["titles"]) == set(rows)
    assert study["raw_pixels"] == (["moco_labelprop"] if cfg.eval.semisup.labelprop.pixel_weight else [])


def test_a_holdout_study_is_marked_as_a_diagnostic(tmp_path, capsys):
    """eval.semisup.holdout scores on labelled training images beyond the N: summary.json and the table say
    it is for method development, not a figure to report; a test-set study is not marked."""
    ckpt, _ = tiny_checkpoint(tmp_path)
    sets = ["eval.semisup.labels=20", "eval.semisup.steps=1", "eval.semisup.rows=moco_probe",
            "eval.semisup.select.folds=0"]
    for holdout in (100, 0):
        cfg = eval_config(str(ckpt), None, [*sets, f"eval.semisup.holdout={holdout}"])
        out = tmp_path / f"out{holdout}"
        result = run_semisup(Job("semisup", str(ckpt), cfg, str(out)), make_runtime("local"),
                             MetricsWriter(out, enabled=False))
        out.mkdir()
        write_summary(out, result)
        print_table("semisup", out, cfg)
        study = result["semisup_holdout" if holdout else "semisup"]["20"]
        assert study["diagnostic"] is bool(holdout)
        assert ("not a reported figure" in study["diagnostic_note"]) is bool(holdout)
        assert ("DIAGNOSTIC ONLY" in capsys.readouterr().out) is bool(holdout)
