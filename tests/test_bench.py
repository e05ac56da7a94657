"""``python -m moco_xla.bench --quick``: bench.json holds every figure the suite promises, and they agree.

One run for CPU eager and XLA:CPU (each backend in its own process), tiny model; the
profiler hook is tested on the CPU backend (torch.profiler files appear).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import XLA_INSTALLED

from moco_xla.bench import main as bench_main
from moco_xla.profiling import StepProfiler, peak_rss_bytes
from moco_xla.runtime import make_runtime

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    backends = "cpu,xla" if XLA_INSTALLED else "cpu"  # no torch_xla: the XLA figures' tests skip
    proc = subprocess.run([sys.executable, "-m", "moco_xla.bench", "--quick", "--backend", backends,
                           "--loader", "digits", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "ratio" in proc.stdout and ("shuffle gather" in proc.stdout or not XLA_INSTALLED)  # the printed table
    return json.loads((out / "bench.json").read_text())


@pytest.mark.parametrize("backend", ["cpu", pytest.param("xla", marks=pytest.mark.needs_xla)])
def test_step_ratio_and_memory(bench, backend):
    r = bench["backends"][backend]
    assert "error" not in r, r
    assert r["moco_images_per_s"] > 0 and r["supervised_images_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["moco_images_per_s"] / r["supervised_images_per_s"])
    assert 0 < r["ratio_limit"] < 1 and r["key_forward_s"] > 0
    assert r["efficiency"] == pytest.approx(r["ratio"] / r["ratio_limit"])
    assert r["measured_steps"] >= 2
    assert r["peak_host_rss_bytes"] > 100 * 2**20  # torch alone is more than that
    assert r["loader_over_step"] > 0
    w = bench["workloads"][backend]
    assert (w["arch"], w["batch"], w["image_size"]) == ("small_resnet", 16, 16)


@pytest.mark.needs_xla
def test_xla_step_compiles_nothing_after_warmup(bench):
    r = bench["backends"]["xla"]
    assert r["precision"] == "bf16"
    assert r["compiles_after_warmup"] == 0
    assert r["fallback_ops_after_warmup"] == 0 and r["fallback_op_names"] == []
    assert r["transfers_after_warmup"] == 0
    assert bench["backends"]["cpu"]["compiles_after_warmup"] is None  # eager: nothing to compile


@pytest.mark.needs_xla
def test_shuffle_bytes_counted_and_read_from_the_graph_agree(bench):
    rows = {(r["mode"], r["world"]): r for r in bench["shuffle"]}
    assert {m for m, _w in rows} == {"gather", "all_to_all"}
    for (mode, world), r in rows.items():
        assert r["hlo_bytes"] == r["count_bytes"] > 0, r
        assert r["key_dtype"] == "torch.bfloat16"  # keys travel in bf16 under autocast
        op = "all-gather" if mode == "gather" else "all-to-all"
        assert r["ops"].count(op) == 2
        assert rows[("gather", world)]["count_bytes"] == world * rows[("all_to_all", world)]["count_bytes"]


def test_loader_and_machine_recorded(bench):
    assert bench["loader"] and all(r["images_per_s"] > 0 for r in bench["loader"])
    assert bench["machine"]["cpus"] >= 1 and bench["machine"]["torch"] == torch.__version__


@pytest.mark.parametrize("args, what", [
    (["--backend", "tpu"], "--backend 'tpu'"), (["--batch", "1"], "--batch must be >= 2"),
    (["--pipelnes"], "did you mean --pipelines?"),
    pytest.param(["--backend", "xla", "--precision", "fp16"], "train.precision=fp16", marks=pytest.mark.needs_xla),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, args, what):
    code = bench_main(["--quick", *args, "--out", str(tmp_path / "b")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and what in lines[0], lines
    assert not (tmp_path / "b").exists()  # nothing ran, nothing written


def test_step_profiler_writes_a_torch_profiler_trace_on_cpu(tmp_path):
    rt = make_runtime("cpu")
    net = torch.nn.Linear(4, 2)
    prof = StepProfiler(rt, str(tmp_path), start=2, steps=2)
    for _ in range(5):
        net(torch.randn(3, 4)).sum().backward()
        prof.step()
    prof.stop()
    traces = list((tmp_path / "rank0").glob("*.pt.trace.json"))
    assert len(traces) == 1 and traces[0].stat().st_size > 100
    assert json.loads(traces[0].read_text())["traceEvents"]
    assert peak_rss_bytes() > 0


def test_pipelines_compares_the_official_host_pipeline_with_moco_xla(tmp_path):
    """--pipelines: one JSON with every row measured side by side; moco_xla ships uint8 views; the
    markdown is the JSON's tables."""
    from moco_xla.bench.pipelines import markdown
    assert bench_main(["--pipelines", "--quick", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "pipelines.json").read_text())
    rows = r["imagenet_cpu_ms"]
    assert set(rows) == {"official (PIL, main_moco.py aug+)", "moco_xla before (decode_bytes + v2 preset)",
                         "moco_xla (CropViews, uint8 to the device)",
                         "moco_xla, the whole JPEG decoded (where _jpeg_region is not built)",
                         "decode only (PIL, full scale)",
                         "decode only (torchvision.io, full scale)", "decode only (simplejpeg, full scale)",
                         "decode only (as CropViews: the crops' rectangle, at the DCT scale they allow)"}
    assert all(ms > 0 for part in ("imagenet_cpu_ms", "cifar_cpu_ms", "shards_cpu_ms") for ms in r[part].values())
    assert len(r["shards_cpu_ms"]) == 6  # old and new transform and the read alone, local and GCS-emulator shards
    assert set(r["large_cpu_ms"]) == {"official (PIL, main_moco.py aug+)", "moco_xla (CropViews, uint8 to the device)",
                                      "moco_xla, the whole JPEG decoded (where _jpeg_region is not built)",
                                      "moco_xla, every JPEG decoded whole at full scale",
                                      "decode only (simplejpeg, full scale)",
                                      "decode only (as CropViews: the crops' rectangle, at the DCT scale they allow)"}
    assert all(ms > 0 for ms in r["large_cpu_ms"].values())
    assert len(r["moco_xla_stages_cpu_ms"]) == 3 and all(ms > 0 for ms in r["moco_xla_stages_cpu_ms"].values())
    assert r["official_over_moco_xla"] == pytest.approx(
        rows["official (PIL, main_moco.py aug+)"] / rows["moco_xla (CropViews, uint8 to the device)"])
    assert r["moco_xla_over_decode"] == pytest.approx(  # over the cheapest decode measured
        rows["moco_xla (CropViews, uint8 to the device)"] / min(ms for name, ms in rows.items() if "decode only" in name))
    assert r["bytes_to_device_per_image"]["moco_xla"] == 2 * 3 * 224 * 224  # uint8
    assert (tmp_path / "pipelines.md").read_text() == markdown(r) + "\n"


def test_pipeline_limits_times_the_paths_not_taken_beside_the_exact_one(tmp_path):
    """--pipeline-limits: decoders and DCT scales, and OpenCV's resizes and the kernel on 4-channel pixels
    beside CropViews' exact view, each with how far its view is from the exact one; the markdown is the
    JSON's table."""
    from moco_xla.bench.pipeline_limits import SCALES, table
    assert bench_main(["--pipeline-limits", "--quick", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "pipeline-limits.json").read_text())
    assert {f"simplejpeg, {m}/8 size" for m in SCALES} <= set(r["decode_cpu_ms"])
    assert all(ms > 0 for ms in r["decode_cpu_ms"].values()) and all(ms > 0 for ms in r["cpu_ms_per_view"].values())
    assert "simplejpeg, 8/8 size, RGBX (4 channels)" in r["decode_cpu_ms"]
    diffs = r["mean_abs_diff_levels"]
    assert len(r["cpu_ms_per_view"]) == 5 and len(diffs) == 4
    assert next(d for name, d in diffs.items() if name.startswith("CropViews")) <= 0.5  # rounding, not another view
    opencv = [d for name, d in diffs.items() if name.startswith("OpenCV")]
    assert len(opencv) == 2 and all(0 < d < 10 for d in opencv)  # near the exact view, and not it
    rgbx = next(d for name, d in diffs.items() if "RGBX" in name)
    assert rgbx < 0.5  # the same kernel on the same decoded pixels: the exact view, up to the decoder's rounding
    assert (tmp_path / "pipeline-limits.md").read_text() == table(r) + "\n"


def test_benchmarks_doc_shows_the_recorded_pipelines():
    """docs/benchmarks.md section 7 embeds benchmarks/results/pipelines.md unchanged, the tables of
    the full run's JSON beside it (both written by --pipelines)."""
    from moco_xla.bench.pipelines import markdown
    results = ROOT / "benchmarks" / "results"
    recorded = json.loads((results / "pipelines.json").read_text())
    md = (results / "pipelines.md").read_text()
    assert md == markdown(recorded) + "\n" and not recorded["quick"]
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    assert docs.split("<!-- pipelines.md: begin -->\n", 1)[1].split("<!-- pipelines.md: end -->")[0] == md
    ratio = recorded["moco_xla_over_decode"]
    assert f"{'met' if ratio <= 1.5 else 'not met'}: {ratio:.2f}x the cheapest decode" in docs


def test_benchmarks_doc_shows_the_recorded_pipeline_limits():
    """docs/benchmarks.md section 7 embeds benchmarks/results/pipeline-limits.md unchanged, and that
    file is the table of the JSON beside it (both written by --pipeline-limits)."""
    from moco_xla.bench.pipeline_limits import table
    results = ROOT / "benchmarks" / "results"
    recorded = json.loads((results / "pipeline-limits.json").read_text())
    md = (results / "pipeline-limits.md").read_text()
    assert md == table(recorded) + "\n" and not recorded["quick"]
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    block = docs.split("<!-- pipeline-limits.md: begin -->\n", 1)[1].split("<!-- pipeline-limits.md: end -->")[0]
    assert block == md
