"""Run records: metrics.jsonl, TensorBoard scalars, PNG plots and summary.json, and their agreement."""
from __future__ import annotations

import json
import time

import pytest
from PIL import Image
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from eval_fns import pretrained_run
from moco_xla.eval.rows import SEMISUP_ROWS
from moco_xla.plots import plot_run
from moco_xla.report import MetricsWriter, read_metrics, read_summary, write_summary

PNG = b"\x89PNG\r\n\x1a\n"
WIDTH, HEIGHT = 640, 400


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    return pretrained_run(tmp_path_factory)


def assert_png(path, size=(WIDTH, HEIGHT)) -> None:
    """A real PNG of the right size that is not a blank canvas."""
    assert path.read_bytes()[:8] == PNG, path
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size
        lo, hi = im.convert("L").getextrema()
    assert hi - lo > 100, f"{path} looks blank"
    assert imread(path).shape[:2] == (size[1], size[0])


def scalars(out, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def synthetic_run(out, epochs: int = 6, steps_per_epoch: int = 4) -> list[dict]:
    records = []
    with_writer = MetricsWriter(out)
    for e in range(1, epochs + 1):
        for s in range(1, steps_per_epoch + 1):
            step = (e - 1) * steps_per_epoch + s
            records.append({"type": "step", "epoch": e, "step": step, "loss": 10.0 - step * 0.1, "acc": 1.0 * step,
                            "lr": 0.03, "images_per_s": 100.0 + s})
        rec = {"type": "epoch", "epoch": e, "step": e * steps_per_epoch, "lr": 0.03 * (1 - e / 10),
               "images_per_s": 100.0 + e, "loss": 10.0 - e, "acc": 5.0 * e, "collapse": False}
        if e % 2 == 0:
            rec["knn_top1"] = 50.0 + e
        records.append(rec)
    for r in records:
        with_writer.write(r)
    write_summary(out, {"uniform_loss": 11.5, "knn_top1": records[-1]["knn_top1"]})
    with_writer.close()
    return records


def test_writer_records_tensorboard_and_plots(tmp_path):
    records = synthetic_run(tmp_path)
    assert read_metrics(tmp_path) == records
    epochs = [r for r in records if r["type"] == "epoch"]
    assert scalars(tmp_path, "epoch/loss") == {r["step"]: r["loss"] for r in epochs}
    assert scalars(tmp_path, "epoch/knn_top1") == {r["step"]: r["knn_top1"] for r in epochs if "knn_top1" in r}
    assert scalars(tmp_path, "epoch/collapse") == {r["step"]: 0.0 for r in epochs}
    assert len(scalars(tmp_path, "step/loss")) == 24
    for name in ("loss", "knn", "lr", "throughput"):
        assert_png(tmp_path / "plots" / f"{name}.png")
    assert not (tmp_path / "plots" / "semisup.png").exists()  # nothing to show yet


def test_non_master_writes_nothing(tmp_path):
    w = MetricsWriter(tmp_path / "replica1", enabled=False)
    w.write({"type": "epoch", "epoch": 1, "loss": 1.0})
    w.close()
    assert not (tmp_path / "replica1").exists()


def test_summary_merges_nested_keys_and_drops_nan(tmp_path):
    write_summary(tmp_path, {"knn_top1": 90.0, "semisup": {"100": {"rows": {"moco_probe": 95.0}}}})
    write_summary(tmp_path, {"linear_top1": float("nan"), "semisup": {"50": {"rows": {"moco_probe": 90.0}}}})
    s = read_summary(tmp_path)
    assert s["knn_top1"] == 90.0 and s["linear_top1"] is None
    assert set(s["semisup"]) == {"100", "50"}
    assert json.loads((tmp_path / "summary.json").read_text()) == s


def test_semisup_bar_chart(tmp_path):
    rows = {k: 60.0 + 7 * i for i, k in enumerate(SEMISUP_ROWS)}
    write_summary(tmp_path, {"semisup": {"100": {"labels": 100, "rows": rows},
                                         "50": {"labels": 50, "rows": {k: v - 5 for k, v in rows.items()}}}})
    made = plot_run(tmp_path / "plots", read_metrics(tmp_path), read_summary(tmp_path))
    assert made == [tmp_path / "plots" / "semisup.png"]
    with Image.open(made[0]) as im:
        height = im.size[1]
    assert height > HEIGHT  # a bar per row and label count: the chart grows to fit every row's name
    assert_png(made[0], (WIDTH, height))


def test_training_summary_agrees_with_metrics(run_dir):
    summary = read_summary(run_dir)
    records = read_metrics(run_dir)
    epochs = [r for r in records if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == list(range(1, summary["epochs"] + 1))
    last = epochs[-1]
    assert summary["knn_top1"] == last["knn_top1"]
    assert summary["final_loss"] == pytest.approx(last["loss"])
    assert summary["steps"] == last["step"]
    knn = {r["step"]: r["knn_top1"] for r in epochs if "knn_top1" in r}
    assert len(knn) >= 2 and scalars(run_dir, "epoch/knn_top1") == pytest.approx(knn)
    for name in ("loss", "knn", "lr", "throughput"):
        assert_png(run_dir / "plots" / f"{name}.png")


def test_resumed_run_replaces_tensorboard_steps(tmp_path):
    w = MetricsWriter(tmp_path, plots=False)
    for step in range(1, 7):
        w.write({"type": "step", "step": step, "loss": 10.0 + step})
    w.close()
    # TensorBoard reads event files in name order, whose first field is the second they were opened
    # in; a resumed run opens its file later than the run before it did, never in the same second
    # (in one second the names would order by a per-process counter: "10" before "9")
    time.sleep(1.0)
    w = MetricsWriter(tmp_path, plots=False, purge_step=4)  # resumed from the checkpoint at step 3
    for step in range(4, 7):
        w.write({"type": "step", "step": step, "loss": 1.0 * step})
    w.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    shown = [(e.step, e.value) for e in acc.Scalars("step/loss")]
    assert shown == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 4.0), (5, 5.0), (6, 6.0)]  # no stale 14, 15, 16


def test_knn_plot_draws_the_raw_pixel_line(tmp_path, monkeypatch):
    """The run's kNN plot shows, beside the encoder's curve, the same kNN on the raw pixels as a line."""
    from moco_xla import plots
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    epochs = [{"epoch": e, "knn_top1": 80.0 + e} for e in (5, 10)]
    epochs[-1]["pixel_knn_top1"] = 88.25
    assert plots.knn_plot({"MoCo": epochs}, tmp_path / "knn.png") == tmp_path / "knn.png"
    ax = drawn[0].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["MoCo"].get_ydata()) == [85.0, 90.0]
    assert set(lines["raw centred pixels (88.2%)"].get_ydata()) == {88.25}
    assert plots.knn_plot({"MoCo": [{"epoch": 1, "loss": 3.0}]}, tmp_path / "none.png") is None  # no kNN yet
