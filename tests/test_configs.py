"""configs/: every config loads and validates, the published hyperparameters in configs/README.md are
the ones the configs resolve to, and every config trains one step on a tiny file of its dataset format."""
from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import pytest

from moco_xla.config import CONFIG_DIR, load_config, validate_world

import data_fixtures

README = CONFIG_DIR / "README.md"
CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
PUBLISHED = ["moco_v1_imagenet", "moco_v2_imagenet", "cifar10", "mnist", "emnist", "imagenet_mini"]


def table_rows() -> list[dict[str, str]]:
    """The 'Published setups' table of configs/README.md as dicts keyed by column name."""
    section = README.read_text().split("## Published setups")[1].split("\n## ")[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    split = lambda ln: [c.strip() for c in ln.strip("|").split("|")]  # noqa: E731
    header = split(lines[0])
    return [dict(zip(header, split(ln))) for ln in lines[2:]]


def launch_config(cell: str):
    """load_config for a README cell such as `--config cifar10 --set moco.symmetric=true`."""
    argv = shlex.split(cell.strip("`"))
    name = argv[argv.index("--config") + 1]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    return name, load_config(name, sets)


@pytest.mark.parametrize("name", CONFIGS)
def test_loads_and_validates(name):
    cfg = load_config(name)
    assert cfg.name == name
    worlds = (1, 4, 8) if cfg.train.batch_size % 8 == 0 else (1,)
    for world in worlds:  # one core (Colab), a v4-8 (4 chips), a v3-8 (8 cores)
        validate_world(cfg, world)


def test_every_published_config_is_in_the_table():
    names = {launch_config(r["launch arguments"])[0] for r in table_rows()}
    assert names == set(PUBLISHED) and set(PUBLISHED) <= set(CONFIGS)


@pytest.mark.parametrize("row", table_rows(), ids=lambda r: r["launch arguments"].strip("`"))
def test_table_matches_config(row):
    _, cfg = launch_config(row["launch arguments"])
    m, t = cfg.moco, cfg.train
    assert cfg.model.arch == row["arch"]
    assert cfg.model.mlp == (row["head"] == "MLP")
    assert m.symmetric == (row["loss"] == "symmetric")
    assert cfg.data.augment == row["aug"]
    assert t.batch_size == int(row["batch"])
    assert math.isclose(t.lr, float(row["lr"])) and math.isclose(t.weight_decay, float(row["wd"]))
    assert m.K == int(row["K"]) and math.isclose(m.m, float(row["m"])) and math.isclose(m.T, float(row["T"]))
    assert t.epochs == int(row["epochs"])
    schedule = row["schedule"].split()
    assert t.schedule == schedule[0]
    if t.schedule == "step":
        assert t.lr_steps == [int(e) for e in schedule[1].split("/")]
    result = row["published result"]
    assert re.match(r"^(\d+\.\d% (linear|kNN) top-1|none published)$", result)
    if "linear" in result:  # measured with main_lincls.py: lr 30, 100 epochs, step 60/80, raw features
        p = cfg.eval.probe
        assert (p.lr, p.epochs, p.schedule, p.lr_steps, p.weight_decay, p.normalize) == \
            (30.0, 100, "step", [60, 80], 0.0, False)


def _write_data(name: str, root: Path) -> None:
    cfg = load_config(name)
    if cfg.data.dataset == "cifar10":
        data_fixtures.write_cifar10(root, n=40, test_n=10)
    elif cfg.data.dataset == "mnist":
        data_fixtures.write_mnist(root, n=40, test_n=10)
    elif cfg.data.dataset == "emnist":
        data_fixtures.write_emnist(root, split=cfg.data.split, n=40, test_n=10)
    else:  # imagenet, imagenet-mini: ImageFolder train/ val/ of JPEGs
        data_fixtures.write_imagenet(root, classes=4, per_class=10, val_per_class=2, size=40)


@pytest.mark.parametrize("name", PUBLISHED)
def test_one_step_on_tiny_data(name, tmp_path, capsys):
    """The config's model, augmentation, BN scheme and loss, shrunk: batch 8-16, 16-32 px, a 64-key queue."""
    from moco_xla.launch import main

    cfg = load_config(name)
    root, out = tmp_path / "data", tmp_path / "run"
    _write_data(name, root)
    batch = 2 * cfg.model.bn_splits if cfg.model.bn_splits > 1 else 8  # two images per Split-BN group
    size = 16 if cfg.model.small_stem else 32  # ImageNet stems downsample 4x at once
    sets = [f"data.root={root}", f"data.image_size={size}", "data.workers=0", f"train.batch_size={batch}",
            "moco.K=64", "train.epochs=1", "train.max_steps_per_epoch=1", "train.log_every=1",
            "eval.knn_k=5", "eval.batch_size=16", "eval.max_bank=16", "checkpoint.every=0"]
    argv = ["--backend", "cpu", "--cores", "1", "--config", name, "--out", str(out)]
    rc = main(argv + [a for s in sets for a in ("--set", s)])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"] == name and summary["steps"] == 1
    assert summary["final_loss"] is not None and math.isfinite(summary["final_loss"])
    assert 0 <= summary["knn_top1"] <= 100
