"""``python -m moco_xla.bench replicas``: N replicas against one at the same global batch and BN group,
every run as a user would launch it, one JSON and one markdown table, resuming where it stopped."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--config", "tiny", "--epochs", "1", "--backends", "cpu", "--bn-group", "8",
         "--set", "train.max_steps_per_epoch=2", "--set", "data.workers=0"]


def bench(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moco_xla.bench", "replicas", *argv], cwd=ROOT, text=True,
                          capture_output=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def launched(stdout: str) -> list[str]:
    return [line.split(":")[1].split()[0] for line in stdout.splitlines() if line.startswith("bench replicas:")]


def test_every_row_keeps_the_global_batch_and_bn_group_and_the_command_resumes(tmp_path):
    out, results = tmp_path / "runs", tmp_path / "results" / "rep.json"
    first = bench(*QUICK, "--replicas", "1,2", "--seeds", "0", "--out", str(out), "--results", str(results))
    assert first.returncode == 0, first.stderr[-3000:]
    assert launched(first.stdout) == ["cpu-1-auto-seed0", "cpu-2-auto-seed0"]
    for name, world, splits in (("cpu-1-auto-seed0", 1, 4), ("cpu-2-auto-seed0", 2, 2)):
        cfg = yaml.safe_load((out / name / "config.yaml").read_text())
        # the global batch of 32 stays; each BN group holds 8 images on 1 and on 2 replicas
        assert cfg["train"]["batch_size"] == 32 and cfg["model"]["bn_splits"] == splits
        assert json.loads((out / name / "summary.json").read_text())["world_size"] == world
    report = json.loads(results.read_text())
    assert all(rec["launches"] == 1 for rec in report["runs"].values())  # none had to be resumed
    one, two = (next(row for row in report["rows"] if row["replicas"] == n) for n in (1, 2))
    assert abs(two["minus_one_replica"] - (two["knn_top1"][0] - one["knn_top1"][0])) < 1e-9
    table = results.with_suffix(".md").read_text()
    line = next(li for li in table.splitlines() if li.startswith("| 2 gloo processes | fp32 |"))
    assert f"| {two['knn_top1'][0]:.2f} | {two['mean']:.2f} | - | {two['minus_one_replica']:+.2f} |" in line
    assert table in first.stdout
    second = bench(*QUICK, "--replicas", "1", "--seeds", "0,1", "--out", str(out), "--results", str(results))
    assert second.returncode == 0, second.stderr[-3000:]
    assert launched(second.stdout) == ["cpu-1-auto-seed1"]  # seed 0 is not run again
    report = json.loads(results.read_text())
    assert set(report["runs"]) == {"cpu-1-auto-seed0", "cpu-1-auto-seed1"}
    knn = [report["runs"][f"cpu-1-auto-seed{s}"]["knn_top1"] for s in (0, 1)]
    assert knn[0] == one["knn_top1"][0]  # read back from the finished run
    (row,) = report["rows"]
    assert row["knn_top1"] == knn and abs(row["mean"] - sum(knn) / 2) < 1e-9 and row["std"] is not None


def test_a_matrix_that_cannot_keep_the_batch_is_a_one_line_error(tmp_path):
    p = bench("--config", "tiny", "--replicas", "1,3", "--out", str(tmp_path))
    assert p.returncode == 2 and p.stderr.startswith("error: --replicas 3 with --bn-group 16")
    assert "global batch 32" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = bench("--backends", "cpu,tpu", "--out", str(tmp_path))
    assert p.returncode == 2 and "--backends 'cpu,tpu'; valid: cpu, xla" in p.stderr
    assert not any(tmp_path.iterdir())  # nothing ran


def test_a_second_invocation_on_the_same_runs_is_refused(tmp_path):
    import fcntl
    with (tmp_path / ".lock").open("w") as held:  # as a running benchmark holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        p = bench(*QUICK, "--replicas", "1", "--seeds", "0", "--out", str(tmp_path))
    assert p.returncode == 2 and p.stderr.strip() == (f"error: another bench replicas is running on {tmp_path}; "
                                                     "wait for it or pass another --out")
    assert sorted(f.name for f in tmp_path.iterdir()) == [".lock"]  # no run started


def test_the_docs_table_is_the_commands_output():
    """docs/benchmarks.md section 8 shows benchmarks/results/replicas-digits.md unchanged, and that file is
    what the command makes of its JSON: nothing merged by hand."""
    from moco_xla.bench.replicas import markdown, precision_gaps, rows
    report = json.loads((ROOT / "benchmarks" / "results" / "replicas-digits.json").read_text())
    assert report["rows"] == rows(report["runs"]) and report["precision"] == precision_gaps(report["rows"])
    table = (ROOT / "benchmarks" / "results" / "replicas-digits.md").read_text()
    assert markdown(report) == table
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    block = docs.split("<!-- replicas-digits.md: begin -->\n", 1)[1].split("<!-- replicas-digits.md: end -->")[0]
    assert block.strip() == table.strip()
