"""The raw-pixel kNN reference: equals a direct numpy computation, the same on 2 gloo and 2 XLA:CPU
replicas as in one process, read on the images as stored where the run upsamples them, and reported
by the training monitor (metrics.jsonl and summary.json)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_gloo
from moco_xla.data.datasets import TensorImages
from moco_xla.eval.pixel_knn import pixel_knn_accuracy
from moco_xla.runtime import make_runtime
from xla_replicas import run_replicas


def images(n: int, seed: int) -> TensorImages:
    """Noisy copies of 3 fixed 6x6 templates on a shared bright background (so centring matters)."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(7))
    y = torch.arange(n) % 3
    x = 6.0 + templates[y] + 4.0 * torch.rand(n, 1, 6, 6, generator=g)
    return TensorImages(x, y)


def numpy_pixel_knn(bank: TensorImages, test: TensorImages, k: int, t: float, classes: int = 3) -> float:
    """The protocol written out: centre on the bank's mean image, L2-normalise, top-k exp(sim / t) vote."""
    b = bank.images.numpy().reshape(len(bank), -1).astype(np.float64)
    q = test.images.numpy().reshape(len(test), -1).astype(np.float64)
    mean = b.mean(axis=0)
    b, q = b - mean, q - mean
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    sim = q @ b.T
    idx = np.argsort(-sim, axis=1)[:, :k]
    votes = np.zeros((len(q), classes))
    for i in range(len(q)):
        for j in idx[i]:
            votes[i, bank.labels[j]] += np.exp(sim[i, j] / t)
    return 100.0 * float((votes.argmax(axis=1) == test.labels.numpy()).mean())


def pixel_knn_on(rt, n_bank: int, n_test: int) -> float:
    return float(pixel_knn_accuracy(rt, images(n_bank, 0), images(n_test, 1), 3, k=7, t=0.1, batch=8))


def test_pixel_knn_equals_numpy_and_centring_matters():
    bank, test = images(45, 0), images(31, 1)
    rt = make_runtime("local")
    top1 = float(pixel_knn_accuracy(rt, bank, test, 3, k=7, t=0.1, batch=8))
    assert round(top1 * 31 / 100) == round(numpy_pixel_knn(bank, test, 7, 0.1) * 31 / 100)  # correct images
    assert 40.0 < top1 < 100.0  # a real classification, not a trivial one
    uncentred = (bank.images.flatten(1) / bank.images.flatten(1).norm(dim=1, keepdim=True))
    assert float((uncentred @ uncentred.t()).min()) > 0.9  # without centring every pair looks alike


@pytest.mark.needs_xla
def test_pixel_knn_same_on_two_gloo_and_two_xla_replicas():
    single = pixel_knn_on(make_runtime("local"), 45, 31)  # 31 test images: padding on one replica
    assert run_gloo(pixel_knn_on, 2, 45, 31) == [single, single]
    assert run_replicas(pixel_knn_on, 2, 45, 31) == [single, single]


def test_reference_reads_the_digits_as_stored_not_upsampled():
    from moco_xla import data
    from moco_xla.config import load_config
    from moco_xla.data.subsets import at_stored_size
    bundle = data.build(load_config("tiny"))  # image_size 16: the 8x8 digits upsampled
    assert bundle.test[0][0].shape == (1, 16, 16)
    stored = at_stored_size(bundle.test, "digits", 16, 1)
    assert stored[0][0].shape == (1, 8, 8) and stored[0][1] == bundle.test[0][1]
    assert at_stored_size(bundle.test, "digits", 8, 1) is bundle.test  # nothing upsampled: unchanged
    assert at_stored_size(bundle.test, "digits", 6, 1) is bundle.test  # downsampled: the pixels fed


def stored_digits(ds, limit: int) -> TensorImages:
    """The first ``limit`` images of a data.build() digits split as scikit-learn stores them (8x8 uint8)."""
    pairs = [ds.base[i] for i in range(min(limit, len(ds.base)))]
    return TensorImages(torch.stack([img for img, _ in pairs]), torch.tensor([label for _, label in pairs]))


def test_monitor_reports_pixel_knn_in_metrics_and_summary(tmp_path):
    from moco_xla import data
    from moco_xla.config import load_config
    from moco_xla.train import train
    cfg = load_config("tiny", ["train.epochs=2", "train.max_steps_per_epoch=2"])
    rt = make_runtime("local")
    summary = train(cfg, rt, tmp_path)
    bundle = data.build(cfg)
    e = cfg.eval
    bank, test = stored_digits(bundle.bank, e.max_bank), stored_digits(bundle.test, len(bundle.test))
    expected = summary["pixel_knn_top1"]  # the protocol written out, on the 8x8 digits as stored
    assert round(expected * len(test) / 100) == round(numpy_pixel_knn(bank, test, e.knn_k, e.knn_t, 10)
                                                       * len(test) / 100)
    upsampled = float(pixel_knn_accuracy(rt, bundle.bank, bundle.test, bundle.num_classes, e.knn_k, e.knn_t,
                                         e.batch_size, e.max_bank))
    assert expected != upsampled  # not the 16-px copies the network reads
    assert json.loads((tmp_path / "summary.json").read_text())["pixel_knn_top1"] == expected
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["type"] == "epoch"]
    assert [r["pixel_knn_top1"] for r in epochs] == [expected, expected]
    assert 80.0 < expected < 100.0  # the centred 8x8 digits, max_bank 256: a real kNN
