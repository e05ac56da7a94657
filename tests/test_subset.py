"""data.subset: a balanced, seeded slice of the training images, for pre-training and the study alike.

On MNIST-format IDX files the tests write (200 training images, 20 per class)."""
from __future__ import annotations

import json

import pytest
import torch

from data_fixtures import write_mnist
from moco_xla import data
from moco_xla.config import load_config
from moco_xla.data.datasets import build_raw
from moco_xla.data.subsets import TrainSlice, train_labels
from moco_xla.errors import UserError
from moco_xla.eval.command import Job, eval_config
from moco_xla.eval.fewlabels import run_semisup
from moco_xla.eval.fewlabels_split import semisup_split
from moco_xla.report import MetricsWriter
from moco_xla.runtime import make_runtime


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("mnist"), n=200, test_n=30)


def _cfg(root, subset: str, seed: int = 0):
    cfg = load_config("tiny", [f"data.root={root}", "data.dataset=mnist", f"data.subset={subset}",
                               f"data.subset_seed={seed}"])
    data.check(cfg)
    return cfg


def _slice(root, subset: str, seed: int = 0) -> TrainSlice:
    bundle = data.build(_cfg(root, subset, seed))
    assert bundle.bank.base is bundle.pretrain.base  # pre-training and the evaluation see one slice
    return bundle.bank.base


def test_subset_is_class_balanced_and_seeded(mnist_root):
    per_class = _slice(mnist_root, "6/class")
    assert len(per_class) == 60
    assert torch.bincount(torch.tensor(per_class.targets), minlength=10).tolist() == [6] * 10
    total = _slice(mnist_root, "25")
    counts = torch.bincount(torch.tensor(total.targets), minlength=10)
    assert len(total) == 25 and int(counts.sum()) == 25 and counts.min() >= 2 and counts.max() <= 3
    assert _slice(mnist_root, "6/class", seed=0).indices == per_class.indices  # same seed, same images
    other = _slice(mnist_root, "6/class", seed=1)
    assert other.indices != per_class.indices  # another seed, another slice
    raw = build_raw(_cfg(mnist_root, "").data).train
    labels = train_labels(raw)
    for i in (0, 17, 59):  # the slice's images and labels are the training set's own
        image, label = per_class[i]
        j = per_class.indices[i]
        assert torch.equal(image, raw[j][0]) and label == int(labels[j]) == per_class.targets[i]
    assert len(data.build(_cfg(mnist_root, "")).bank) == 200  # no subset: every image


@pytest.mark.parametrize("value, says", [
    ("abc", "'data.subset' is 'abc'; valid: null"), ("0", "'data.subset' is '0'"), ("-5", "'data.subset' is '-5'"),
    ("5/klass", "'data.subset' is '5/klass'"),
    ("30/class", "data.subset=30/class: a balanced slice of 300 needs 30 images of class"),
    ("5", "data.subset=5: a balanced slice of 5 is fewer than the 10 classes")])
def test_bad_subset_is_a_one_line_error(mnist_root, value, says):
    with pytest.raises(UserError) as e:
        data.build(_cfg(mnist_root, value))
    assert says in str(e.value) and "\n" not in str(e.value)


def test_pretraining_and_the_study_run_on_the_slice(mnist_root, tmp_path, capsys):
    """Pre-training's epoch is the slice's (40 images, batch 8: 5 steps, not the full set's 25) and the
    study's labelled and unlabelled images are drawn from the same slice (the checkpoint carries it)."""
    from moco_xla.launch import main

    run = tmp_path / "run"
    sets = [f"data.root={mnist_root}", "data.dataset=mnist", "data.subset=4/class", "data.subset_seed=3",
            "train.batch_size=8", "moco.K=32", "train.epochs=1", "train.max_steps_per_epoch=0",
            "eval.knn_every=0", "eval.batch_size=16"]
    rc = main(["--backend", "cpu", "--cores", "1", "--config", "tiny", "--out", str(run),
               *[a for s in sets for a in ("--set", s)]])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((run / "summary.json").read_text())["steps"] == 5
    ckpt = sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1]
    cfg = eval_config(str(ckpt), None, ["eval.semisup.labels=20", "eval.semisup.steps=1",
                                        "eval.semisup.rows=moco_probe", "eval.semisup.select.folds=0"])
    assert (cfg.data.subset, cfg.data.subset_seed) == ("4/class", 3)
    bundle = data.build(cfg)
    split = semisup_split(cfg, bundle)
    assert len(bundle.bank) == 40 and torch.equal(split.pool, torch.arange(40)) and int(split.picked.max()) < 40
    assert bundle.bank.base.indices == _slice(mnist_root, "4/class", seed=3).indices
    study = run_semisup(Job("semisup", str(ckpt), cfg, str(tmp_path / "eval")), make_runtime("local"),
                        MetricsWriter(tmp_path / "eval", enabled=False))["semisup"]["20"]
    assert study["distill"]["unlabelled_pool"] == 40 and 0.0 <= study["rows"]["moco_probe"] <= 100.0
