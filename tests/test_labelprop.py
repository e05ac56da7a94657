"""Label propagation (moco_xla/eval/labelprop.py): the closed form it iterates to, a toy problem where the
unlabelled points carry the answer, and the study's propagation on 2 gloo replicas (the XLA replicas
run it in test_xla_replicas.py)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import make_moons

from conftest import run_gloo
from eval_fns import Points, study_propagation
from moco_xla.eval.labelprop import graph_features, knn_graph, propagate, symmetric_product
from moco_xla.eval.distill import DistillSpec, distill, paired
from moco_xla.data.subsets import Relabelled
from moco_xla.schedule import SGDSpec
from moco_xla.eval.fit import image_accuracy, image_batches
from moco_xla.runtime import make_runtime


def dense_graph(feats: torch.Tensor, k: int, gamma: float) -> torch.Tensor:
    """The kNN graph as an n x n matrix, A + A^T, from a brute-force neighbour search."""
    sim = feats @ feats.t()
    sim.fill_diagonal_(-2.0)
    w, i = sim.topk(k, dim=1)
    a = torch.zeros_like(sim).scatter_(1, i, w.clamp(min=0) ** gamma)
    return a + a.t()


def test_knn_graph_excludes_self_and_chunks_agree():
    feats = F.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    idx, w = knn_graph(feats, 5, 3.0)
    assert idx.shape == w.shape == (50, 5)
    assert not (idx == torch.arange(50).unsqueeze(1)).any() and (w >= 0).all()
    idx7, w7 = knn_graph(feats, 5, 3.0, chunk=7)  # rows scored 7 at a time, the last chunk short
    assert torch.equal(idx7, idx) and torch.allclose(w7, w)


def test_symmetric_product_is_the_dense_symmetric_graph_times_g():
    feats = F.normalize(torch.randn(40, 6, generator=torch.Generator().manual_seed(1)), dim=1)
    g = torch.randn(40, 3)
    idx, w = knn_graph(feats, 4, 2.0)
    torch.testing.assert_close(symmetric_product(idx, w, g), dense_graph(feats, 4, 2.0) @ g)


def test_propagation_reaches_the_closed_form():
    """Zhou et al.'s fixed point (1 - alpha)(I - alpha S)^-1 Y, solved densely, has the same argmax."""
    gen = torch.Generator().manual_seed(2)
    feats = F.normalize(torch.randn(120, 4, generator=gen), dim=1)
    seeds, seed_labels = torch.arange(0, 120, 12), torch.arange(10) % 3
    w = dense_graph(feats, 6, 3.0)
    d = w.sum(1).rsqrt()
    s = d[:, None] * w * d[None, :]
    y = torch.zeros(120, 3)
    y[seeds, seed_labels] = 1
    closed = torch.linalg.solve(torch.eye(120) - 0.9 * s, y).argmax(1)
    closed[seeds] = seed_labels
    got = propagate(feats, seeds, seed_labels, 3, 6, 0.9, 300)
    assert torch.equal(got, closed)
    assert (got != closed[torch.randperm(120, generator=gen)]).any()  # not a constant answer


def test_an_image_no_seed_reaches_takes_its_most_similar_seed_label():
    """Three tight clusters, seeds in two: the third is a component of its own (its neighbours stay inside
    it) and takes the label of the seed it is most similar to, not class 0 by default."""
    gen = torch.Generator().manual_seed(3)
    centres = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.6, 0.8]]), dim=1)
    feats = F.normalize(centres.repeat_interleave(10, 0) + 0.01 * torch.randn(30, 3, generator=gen), dim=1)
    got = propagate(feats, torch.tensor([0, 10]), torch.tensor([1, 2]), 3, 3, 0.9, 50)
    assert torch.equal(got[:10], torch.ones(10, dtype=torch.long))
    assert torch.equal(got[10:], torch.full((20,), 2))  # the unseeded cluster is nearest the second seed


def moons(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_moons(n, noise=0.05, random_state=seed)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def test_two_labels_label_both_moons_where_nearest_labelled_point_fails():
    """One labelled point per moon: the graph carries each label along its moon."""
    x, y = moons(400, 0)
    seeds = torch.stack([(y == c).nonzero().flatten()[x[y == c, 0].argmin() if c else x[y == c, 0].argmax()]
                         for c in (0, 1)])  # the tip of each moon that points into the other
    got = propagate(_rbf(x), seeds, y[seeds], 2, 8, 0.99, 400)
    nearest = y[seeds][torch.cdist(x, x[seeds]).argmin(1)]
    assert (got == y).float().mean() > 0.98
    assert (nearest == y).float().mean() < 0.9


def test_graph_features_with_pixels_mix_the_two_cosines():
    """eval.semisup.labelprop.pixel_weight w: two images' cosine on the joined features is (1 - w) x their
    encoder features' cosine + w x their pixels'; at w 0 the graph sees the encoder alone."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    x = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    assert graph_features(net, 0.0) is net
    joined = graph_features(net, 0.3)(x)
    assert joined.shape == (6, 5 + 16)
    torch.testing.assert_close(joined.norm(dim=1), torch.ones(6))
    feats, pixels = F.normalize(net(x), dim=1), F.normalize(x.flatten(1), dim=1)
    torch.testing.assert_close(joined @ joined.t(), 0.7 * feats @ feats.t() + 0.3 * pixels @ pixels.t())


def _rbf(x: torch.Tensor) -> torch.Tensor:
    """Unit-norm random Fourier features of the points: cosine similarity ~ a Gaussian kernel of distance."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(2, 2048, generator=g) * 6.0, torch.rand(2048, generator=g) * 6.2832
    return F.normalize(torch.cos(x @ w + b), dim=1)


def test_a_student_without_teacher_learns_the_labels_its_batches_carry():
    """distill(teacher=None): the targets of the unlabelled term are the pool's own (propagated) labels."""
    rt = make_runtime("local")
    x, y = moons(400, 1)
    test = Points(*moons(400, 2))
    pool = Points(x, y)  # stands in for the propagated labels: the true ones
    labelled = Relabelled(pool, torch.tensor([0, 1]), y[:2])
    batches = paired(image_batches(rt, pool, 100, 1), image_batches(rt, labelled, 2, 2))
    student = distill(rt, None, nn.Sequential(nn.Linear(2, 64), nn.ReLU()), 64, 2, batches, 200,
                      SGDSpec(0.5, 0.9, 0.0, "cosine"), DistillSpec(label_weight=0.0), 0)
    assert float(image_accuracy(rt, student, test, 400)) > 95.0


def test_study_propagation_on_two_gloo_replicas_equals_one():
    """Each replica embeds its share; the gathered graph and the propagation are the same everywhere."""
    alone = study_propagation(make_runtime("local"))
    r0, r1 = run_gloo(study_propagation, 2)
    assert torch.equal(r0["labels"], alone["labels"]) and torch.equal(r1["labels"], alone["labels"])
    assert torch.equal(r0["joined"], alone["joined"]) and torch.equal(r1["joined"], alone["joined"])
    assert alone["joined_accuracy"] > 80.0 and not torch.equal(alone["joined"], alone["labels"]), alone
    assert alone["seeds_kept"] and alone["accuracy"] > 80.0, alone  # 20 labels, raw pixels of the digits
