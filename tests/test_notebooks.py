"""The Colab and Kaggle notebooks, executed headless (nbclient + ipykernel) the way a user runs them,
with MOCO_XLA_SMOKE=1: the tiny config on this CPU, no installs. Every cell must run, training and
the semi-supervised study must leave their results, and the plots must reach the notebook as PNGs."""
from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KINDS = ("colab", "kaggle")


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def _pngs(cell) -> list[bytes]:
    return [base64.b64decode(o["data"]["image/png"]) for o in cell.get("outputs", [])
            if "image/png" in o.get("data", {})]


def _cell(nb, needle: str):
    """The code cell whose source contains ``needle``."""
    return next(c for c in nb.cells if c.cell_type == "code" and needle in c.source)


def _check(kind: str, nb, cwd: Path) -> None:
    assert "already installed" in _text(_cell(nb, "def find_checkout"))  # smoke runs never pip install
    assert "backend cpu, 1 replica(s)" in _text(_cell(nb, "resolve_backend("))
    run = cwd / "runs" / f"{kind}-tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"] == "tiny" and summary["knn_top1"] is not None

    pngs = _pngs(_cell(nb, "InfoNCE loss"))
    assert pngs and all(p.startswith(PNG_SIGNATURE) for p in pngs), f"{kind}: no loss/kNN plot in the notebook"

    study = summary["semisup"]["100"]
    assert set(study["rows"]) >= {"moco_probe", "moco_finetune", "moco_distill", "supervised_scratch",
                                  "scratch_distill", "pixel_logistic", "random_probe"}
    assert study["steps"] == study["distill"]["steps"] == 3  # the smoke run's quick study
    printed = _text(_cell(nb, "moco_xla.eval"))
    assert all(row in printed for row in study["rows"]), printed[-2000:]


@pytest.mark.needs_xla  # the TPU notebooks: without the torch_xla pins their setup cell pip installs them
def test_notebooks_run_headless(tmp_path, monkeypatch):
    """Both notebooks at once (two kernels): their cells mostly wait on child processes."""
    monkeypatch.setenv("MOCO_XLA_SMOKE", "1")
    monkeypatch.setenv("MOCO_XLA_DIR", str(ROOT))  # the checkout; the notebooks' cwd is elsewhere
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two notebooks share the cores: no thread oversubscription
    runs = {}
    for kind in KINDS:
        nb = nbformat.read(ROOT / "notebooks" / f"{kind}_tpu.ipynb", as_version=4)
        nbformat.validate(nb)
        assert nb.metadata["accelerator"] == "TPU"
        (tmp_path / kind).mkdir()
        runs[kind] = (nb, NotebookClient(nb, timeout=300, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path / kind)}}))

    async def execute_all():
        await asyncio.gather(*(client.async_execute() for _, client in runs.values()))

    asyncio.run(execute_all())
    for kind, (nb, _) in runs.items():
        _check(kind, nb, tmp_path / kind)
