"""The few-label study's seams: its one row catalogue, and one read of the checkpoint per study."""
from __future__ import annotations

from eval_fns import tiny_checkpoint
from moco_xla import checkpoint
from moco_xla.config import SemisupConfig
from moco_xla.eval.command import Job, eval_config, print_table
from moco_xla.eval.fewlabels import run_semisup
from moco_xla.eval.rows import BY_KEY, KINDS, ROWS, SEMISUP_ROWS, row_lr, row_steps, selected_rows, title
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
    steps = {row.key: row_steps(row, s) for row in ROWS}
    assert steps["pixel_logistic"] == 0 and steps["moco_finetune"] == 11 and steps["scratch_distill"] == 13
    assert [r.key for r in selected_rows("scratch_distill")] == ["supervised_scratch", "scratch_distill"]
    assert title("moco_labelprop", 0.5) == "MoCo + 0.5 pixels label propagation + distilled"
    assert title("moco_labelprop") == SEMISUP_ROWS["moco_labelprop"]


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
        "eval.semisup.distill.batch_size=32", "eval.semisup.rows=moco_probe,moco_labelprop"])
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
    assert all(SEMISUP_ROWS[key] in printed for key in rows)
