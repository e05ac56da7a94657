"""The weighted kNN monitor: hand-computed votes, synthetic clusters, N gloo replicas == one replica."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import run_gloo
from eval_fns import Points, clusters, knn_on_points
from moco_xla.eval.knn import knn_accuracy, knn_predict
from moco_xla.runtime import make_runtime


def test_weighted_vote_matches_hand_computation():
    a = 0.5  # two class-0 neighbours at angle a outvote one class-1 neighbour at angle 0, unless t is small
    bank = torch.tensor([[1.0, 0.0], [math.cos(a), math.sin(a)], [math.cos(a), -math.sin(a)]])
    labels = torch.tensor([1, 0, 0])
    q = torch.tensor([[1.0, 0.0]])
    for t in (0.1, 1.0):
        scores = knn_predict(q, bank, labels, classes=2, k=3, t=t)
        expected = torch.tensor([[2 * math.exp(math.cos(a) / t), math.exp(1 / t)]])
        torch.testing.assert_close(scores, expected)
    assert knn_predict(q, bank, labels, 2, 3, 0.1).argmax() == 1  # sharp weights: the closest wins
    assert knn_predict(q, bank, labels, 2, 3, 1.0).argmax() == 0  # flat weights: the majority wins
    only_nearest = knn_predict(q, bank, labels, 2, k=1, t=1.0)
    torch.testing.assert_close(only_nearest, torch.tensor([[0.0, math.e]]))


def test_clusters_with_known_accuracy():
    rt = make_runtime("local")
    bank_x, bank_y = clusters(200, 5, 16, seed=0)
    test_x, test_y = clusters(100, 5, 16, seed=1)
    acc = knn_accuracy(rt, nn.Identity(), Points(bank_x, bank_y), Points(test_x, test_y), 5, k=20, batch=32)
    assert float(acc) == 100.0
    # relabel every other test point to the next class: kNN still finds the true cluster -> exactly 50 %
    shifted = torch.where(torch.arange(100) % 2 == 1, (test_y + 1) % 5, test_y)
    acc = knn_accuracy(rt, nn.Identity(), Points(bank_x, bank_y), Points(test_x, shifted), 5, k=20, batch=32)
    assert float(acc) == 50.0


def test_bank_limit_uses_the_first_samples():
    rt = make_runtime("local")
    x, y = clusters(60, 3, 8, seed=2)
    y_bad = y.clone()
    y_bad[30:] = (y[30:] + 1) % 3  # only the first 30 bank samples carry the right labels
    acc_full = knn_accuracy(rt, nn.Identity(), Points(x, y_bad), Points(x, y), 3, k=5, batch=16)
    acc_first = knn_accuracy(rt, nn.Identity(), Points(x, y_bad), Points(x, y), 3, k=5, batch=16, max_bank=30)
    assert float(acc_first) == 100.0 and float(acc_full) < 80.0


def test_three_gloo_replicas_equal_one_replica():
    # overlapping clusters (accuracy well below 100 %) and sizes that leave padding on some replicas
    bank = clusters(101, 4, 8, seed=3, spread=0.6)
    test = clusters(37, 4, 8, seed=4, spread=0.6)
    single = knn_on_points(make_runtime("local"), bank, test, 4, 10, 8)
    assert 40.0 < single["acc"] < 100.0
    torch.testing.assert_close(single["bank"], F.normalize(bank[0], dim=1))
    for result in run_gloo(knn_on_points, 3, bank, test, 4, 10, 8):
        assert result["acc"] == single["acc"]
        torch.testing.assert_close(result["bank"], single["bank"])  # gathered in dataset order
        assert torch.equal(result["labels"], bank[1])


def test_centring_subtracts_the_bank_mean_before_normalising():
    rt = make_runtime("local")
    # by hand: bank A (1, 0) and B (3, 0.5), mean (2, 0.25); the query (1.5, 0.3) lies nearer A, but in
    # angle nearer B (0.03 rad against 0.2); centred, it points at A - mean and away from B - mean
    bank = Points(torch.tensor([[1.0, 0.0], [3.0, 0.5]]), torch.tensor([0, 1]))
    query = Points(torch.tensor([[1.5, 0.3]]), torch.tensor([0]))
    assert float(knn_accuracy(rt, nn.Identity(), bank, query, 2, k=1)) == 0.0
    assert float(knn_accuracy(rt, nn.Identity(), bank, query, 2, k=1, centre=True)) == 100.0
    # on clusters: the same as subtracting the bank's mean by hand, wherever an offset puts them
    (bank_x, bank_y), (test_x, test_y) = clusters(120, 4, 8, seed=5, spread=0.5), clusters(60, 4, 8, seed=6, spread=0.5)
    mean = bank_x.mean(dim=0)
    by_hand = knn_accuracy(rt, nn.Identity(), Points(bank_x - mean, bank_y), Points(test_x - mean, test_y), 4, k=10,
                           batch=16)
    for offset in (0.0, 3.0, -30.0):
        centred = knn_accuracy(rt, nn.Identity(), Points(bank_x + offset, bank_y), Points(test_x + offset, test_y), 4,
                               k=10, batch=16, centre=True)
        assert abs(float(centred) - float(by_hand)) < 1e-4
