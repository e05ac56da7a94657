"""``python -m moco_xla.launch --check``: real preflights (gloo, the 2-replica XLA:CPU rehearsal with
its compiled step, shards and checkpoints in the GCS emulator) and a failing one."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--set", "model.width=4", "--set", "moco.K=64"]


def check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               **(env or {})}
    return subprocess.run([sys.executable, "-m", "moco_xla.launch", "--check", *args], capture_output=True,
                          text=True, timeout=240, env=environ, cwd=ROOT)


def lines(p: subprocess.CompletedProcess) -> dict[str, str]:
    return {ln.split(":")[0].split()[1]: ln.split()[0] for ln in p.stdout.splitlines() if ln.startswith(("ok", "FAIL"))}


def test_preflight_on_gloo_all_ok(tmp_path):
    p = check("--backend", "cpu", "--cores", "2", "--config", "tiny", "--out", str(tmp_path / "run"))
    assert p.returncode == 0, p.stdout + p.stderr[-2000:]
    assert lines(p) == dict.fromkeys(("versions", "devices", "batch", "data", "checkpoints", "kaggle"), "ok")
    assert "world size 2" in p.stdout and "BN groups of 8 (Split BN 2 per replica)" in p.stdout
    assert not any(tmp_path.glob("run/checkpoints/.preflight*"))  # the probe file is removed; nothing trained
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.needs_xla
def test_preflight_on_the_xla_rehearsal_compiles_one_step(tmp_path):
    p = check("--backend", "xla", "--cores", "2", "--config", "tiny", "--out", str(tmp_path / "run"), *SMALL,
              env={"PJRT_DEVICE": "CPU", "TPU_PROCESS_ADDRESSES": "local",
                   "XLA_FLAGS": "--xla_backend_optimization_level=0"})
    assert p.returncode == 0, p.stdout + p.stderr[-2000:]
    assert lines(p)["compile"] == "ok" and "one step of batch 16 (bf16) on xla:0" in p.stdout
    assert "TPU_PROCESS_ADDRESSES=local (Kaggle): removed" in p.stdout


def test_unreadable_data_root_fails_with_one_line_reason(tmp_path):
    p = check("--backend", "cpu", "--config", "tiny", "--out", str(tmp_path / "run"),
              "--set", "data.dataset=cifar10", "--set", f"data.root={tmp_path / 'missing'}")
    assert p.returncode != 0
    failed = [ln for ln in p.stdout.splitlines() if ln.startswith("FAIL")]
    assert len(failed) == 1 and failed[0].startswith("FAIL  data: ") and "missing" in failed[0], p.stdout
    assert lines(p)["checkpoints"] == "ok"  # the other checks still ran


def test_shards_and_checkpoints_in_a_bucket(tmp_path):
    """gs:// data and checkpoint.dir through the fake-gcs-server emulator; a missing bucket fails."""
    from moco_xla import shards
    from moco_xla.data.emulator import gcs_emulator
    with gcs_emulator(["preflight"]):
        assert shards.main(["--dataset", "digits", "--out", "gs://preflight/digits", "--shard-size", "400",
                            "--quiet"]) == 0
        common = ("--backend", "cpu", "--config", "tiny", "--out", str(tmp_path / "run"),
                  "--set", "data.root=gs://preflight/digits")
        p = check(*common, "--set", "checkpoint.dir=gs://preflight/ckpt")
        assert p.returncode == 0, p.stdout + p.stderr[-2000:]
        assert "gs://preflight/ckpt writable" in p.stdout and "from gs://preflight/digits" in p.stdout
        bad = check(*common, "--set", "checkpoint.dir=gs://no-such-bucket/ckpt")
    assert bad.returncode != 0 and lines(bad)["checkpoints"] == "FAIL", bad.stdout
    assert "no-such-bucket" in next(ln for ln in bad.stdout.splitlines() if ln.startswith("FAIL"))
