"""The few-label study's raw-pixel rows (logistic regression, label propagation's pixel graph) read the
images as stored where the run upsamples them (the digits' 8x8 at image_size 16), as the kNN monitor's
pixel reference does, or, with eval.semisup.pixel_input=fed, what the network reads."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from moco_xla import data
from moco_xla.config import load_config
from moco_xla.data.subsets import Relabelled, subset
from moco_xla.eval import fewlabels
from moco_xla.eval.probe import pixel_logistic
from moco_xla.eval.rows import BY_KEY
from moco_xla.runtime import make_runtime


def study(overrides: list[str]) -> fewlabels.Study:
    cfg = load_config("tiny", ["eval.semisup.labels=50", *overrides])  # tiny: the digits at 16 px
    return fewlabels.prepare(cfg, make_runtime("local"), data.build(cfg))


def test_every_view_the_pixel_rows_take_is_the_stored_8x8_digits():
    st = study([])
    held = torch.tensor([3, 5, 8])
    views = {"labelled": st.labelled, "test": st.split.test, "a fold": Relabelled(st.bank, held, held % 10),
             "holdout": subset(st.bank, held)}
    for name, ds in views.items():
        stored = st.pixel_view(ds)
        assert ds[0][0].shape == (1, 16, 16) and stored[0][0].shape == (1, 8, 8), name
        assert len(stored) == len(ds) and [stored[i][1] for i in range(3)] == [ds[i][1] for i in range(3)], name
    graph = fewlabels.graph_for(BY_KEY["pixel_labelprop"], st, encoders=None)
    assert graph.bank is st.pixel_bank and graph.bank[0][0].shape == (1, 8, 8)


def test_pixel_logistic_row_is_scikit_learn_on_the_digits_as_stored():
    st = study([])
    c = 0.1
    row = float(fewlabels.logistic_row(st, c))

    def stored(ds, indices) -> tuple[np.ndarray, np.ndarray]:  # the uint8 8x8 digits, no transform
        pairs = [ds.base[int(i)] for i in indices]
        return np.stack([img.numpy().ravel() for img, _ in pairs]).astype(np.float64), np.array([y for _, y in pairs])

    x, y = stored(st.bank, st.split.picked)
    xt, yt = stored(st.split.test, range(len(st.split.test)))
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000)).fit(x, y)
    expected = 100.0 * float((clf.predict(xt) == yt).mean())
    assert abs(row - expected) <= 100.0 / len(yt) + 1e-9  # at most one test digit apart (the solver's rounding)
    upsampled = float(pixel_logistic(st.rt, st.labelled, st.split.test, c, 256))
    assert row != upsampled  # not the 16-px copies the network reads
    assert 60.0 < row < 100.0


def test_fed_pixels_and_runs_that_upsample_nothing_read_what_the_network_reads():
    for overrides in (["data.image_size=8"], ["eval.semisup.pixel_input=fed"]):
        st = study(overrides)
        assert st.pixel_bank is st.bank and st.pixel_view(st.split.test) is st.split.test
    c = 0.1
    assert float(fewlabels.logistic_row(st, c)) == float(pixel_logistic(st.rt, st.labelled, st.split.test, c, 256))


def test_the_docs_table_of_the_rerun_pixel_rows_is_the_scripts_output():
    """docs/fewlabels.md shows benchmarks/results/fewlabels-digits-pixels.md unchanged, and that file is
    what benchmarks/fewlabels_pixels.py makes of its JSON and of the study it reruns."""
    import importlib.util
    import json

    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("fewlabels_pixels", ROOT / "benchmarks" / "fewlabels_pixels.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    report = json.loads(script.RESULTS.read_text())
    table = script.RESULTS.with_suffix(".md").read_text()
    assert script.markdown(report, json.loads(script.STUDY.read_text())) + "\n" == table
    for by_draw in report["studies"].values():  # every draw on both inputs, each at its own size
        assert all({m["pixel_size"] for m in d.values()} == {16, 8} for d in by_draw.values())
    readme = " ".join((ROOT / "README.md").read_text().split())
    study = json.loads(script.STUDY.read_text())
    assert " / ".join(f"{m:+.1f}" for m, _ in script.margins(report, study, "100")) in readme
    docs = (ROOT / "docs" / "fewlabels.md").read_text()
    marker = "<!-- fewlabels-digits-pixels.md: {} -->"
    block = docs.split(marker.format("begin") + "\n", 1)[1].split(marker.format("end"))[0]
    assert block.strip() == table.strip()
