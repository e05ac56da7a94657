"""Bad data met inside torch_xla's MpDeviceLoader thread stops the run on XLA, as on every backend.

MpDeviceLoader iterates the host loader in a background thread, where an exception only
ends the iteration early: without XlaRuntime.device_loader re-raising it, the kNN monitor
would score a partial test set and training would run a short epoch. Runs on XLA:CPU in a
child process (PJRT_DEVICE=CPU), so no torch_xla state leaks into the other tests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.needs_xla  # an XLA:CPU replica: skipped where torch_xla is not installed

SCRIPT = r"""
import json, sys
sys.path.insert(0, "tests")
from pathlib import Path
import torch
from data_fixtures import write_image_folder
from moco_xla import data
from moco_xla.config import load_config
from moco_xla.errors import UserError
from moco_xla.eval.knn import knn_accuracy
from moco_xla.models import build_encoder
from moco_xla.runtime import make_runtime

root = Path(sys.argv[1])
write_image_folder(root, classes=2, per_class=12, size=16, fmt="png")
cfg = load_config("tiny", ["data.dataset=folder", f"data.root={root}", "data.test_fraction=0.25"])
rt = make_runtime("xla")
bundle = data.build(cfg)
test_paths = [path for path, _ in bundle.test.base.samples]
out = {"device": str(rt.device), "test_images": len(test_paths)}

net = build_encoder(cfg.model).backbone.to(rt.device)
out["clean_top1"] = float(knn_accuracy(rt, net, bundle.bank, bundle.test, bundle.num_classes, k=5, batch=2))

bad = test_paths[-1]  # the last test image: its batch comes last
Path(bad).write_bytes(b"not an image at all")
out["bad"] = bad
batches = []
try:
    for x, y, valid in rt.device_loader(data.eval_loader(bundle.test, 2, 0, 1)):
        batches.append(int(valid.sum()))
    out["loader_error"] = None
except UserError as e:
    out["loader_error"] = str(e)
out["batches_before_error"] = len(batches)
try:
    out["knn_top1"] = float(knn_accuracy(rt, net, bundle.bank, bundle.test, bundle.num_classes, k=5, batch=2))
    out["knn_error"] = None
except UserError as e:
    out["knn_error"] = str(e)
print("RESULT", json.dumps(out))
"""


def test_bad_image_in_device_loader_thread_is_raised(tmp_path):
    env = {**os.environ, "PJRT_DEVICE": "CPU"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "folder")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    out = json.loads(lines[0][len("RESULT "):])
    assert out["device"].startswith("xla")
    assert 0.0 <= out["clean_top1"] <= 100.0
    # The good batches arrive first; the bad image's batch ends the loop with its one-line error.
    assert out["batches_before_error"] == out["test_images"] // 2 - 1
    assert out["loader_error"] is not None and out["bad"] in out["loader_error"]
    assert "\n" not in out["loader_error"]
    # The kNN monitor does not return an accuracy over a partial test set.
    assert "knn_top1" not in out and out["bad"] in out["knn_error"]
