"""``python -m moco_xla.bench fewlabels``: pre-training, every study, one JSON and one markdown table,
resuming where it stopped."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval_fns import SMALL_SELECT

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--config", "digits", "--labels", "20", "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2",
         "--set", "eval.knn_every=0", "--set", "data.workers=0", "--set", "eval.semisup.steps=2",
         "--set", "eval.semisup.rows=moco_probe,pixel_logistic", "--backend", "cpu",
         *[arg for s in SMALL_SELECT for arg in ("--set", s)]]


def bench(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moco_xla.bench", "fewlabels", *argv], cwd=ROOT, text=True,
                          capture_output=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_one_command_pretrains_runs_every_draw_and_resumes(tmp_path):
    out, results = tmp_path / "runs", tmp_path / "results" / "fl.json"
    first = bench(*QUICK, "--draws", "0", "--out", str(out), "--results", str(results))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "python -m moco_xla.launch" in first.stdout and first.stdout.count("python -m moco_xla.eval") == 1
    second = bench(*QUICK, "--draws", "0,1", "--out", str(out), "--results", str(results))
    assert second.returncode == 0, second.stderr[-3000:]
    # resumed: the finished pre-training and draw 0 are not run again, draw 1 is
    assert "python -m moco_xla.launch" not in second.stdout
    assert second.stdout.count("python -m moco_xla.eval") == 1 and "eval.semisup.seed=1" in second.stdout
    report = json.loads(results.read_text())
    studies = report["studies"]["20"]
    assert set(studies) == {"0", "1"} and studies["0"]["seed"] == 0 and studies["1"]["seed"] == 1
    for study in studies.values():
        assert set(study["rows"]) == {"moco_probe", "pixel_logistic"}
        assert study["selection"]["moco_probe"]["folds"] == 2  # chosen on the 20 labelled images
    assert report["pretrain"]["knn_top1"] is not None and report["pretrain"]["pixel_knn_top1"] is not None
    assert report["pretrain"]["knn_curve"][-1] == [report["pretrain"]["epochs"], report["pretrain"]["knn_top1"]]
    table = results.with_suffix(".md").read_text()
    assert "| row | draw 0 | draw 1 | mean | chosen |" in table
    probe = next(line for line in table.splitlines() if line.startswith("| MoCo linear probe"))
    values = [studies[d]["rows"]["moco_probe"] for d in ("0", "1")]
    assert f"| {values[0]:.2f} | {values[1]:.2f} | {sum(values) / 2:.2f} |" in probe
    assert "raw-pixel logistic regression" in table and "strongest row without pre-training" in table
    assert table in second.stdout


def test_bad_label_counts_are_one_line_errors(tmp_path):
    p = bench("--labels", "100,x", "--out", str(tmp_path))
    assert p.returncode == 2 and "--labels '100,x': give comma-separated whole numbers >= 1" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["fewlabels-digits", "fewlabels-mnist-dev"])
def test_the_docs_table_is_the_commands_output(name):
    """docs/fewlabels.md shows benchmarks/results/NAME.md unchanged, and that file is what the
    command makes of its JSON: nothing merged by hand."""
    from moco_xla.bench.fewlabels import markdown
    results = ROOT / "benchmarks" / "results" / f"{name}.json"
    table = results.with_suffix(".md").read_text()
    assert markdown(json.loads(results.read_text())) == table
    docs = (ROOT / "docs" / "fewlabels.md").read_text()
    block = docs.split(f"<!-- {name}.md: begin -->\n", 1)[1].split(f"<!-- {name}.md: end -->")[0]
    assert block.strip() == table.strip()


@pytest.mark.parametrize("name, digits", [("fewlabels-digits", 1), ("fewlabels-mnist-dev", 2)])
def test_the_readme_quotes_the_commands_margins(name, digits):
    """The README's few-label margins at 100 labels are the results JSON's, draw by draw."""
    from moco_xla.eval.rows import study_margins
    report = json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())
    by_draw = report["studies"]["100"]
    readme = " ".join((ROOT / "README.md").read_text().split())
    for key in ("over_no_pretraining", "over_scratch"):
        quoted = " / ".join(f"{study_margins(by_draw[d])[key]['margin']:+.{digits}f}"
                            for d in sorted(by_draw, key=int))
        assert quoted in readme, (key, quoted)
