"""Label propagation: a few labels spread along the nearest-neighbour graph of all training images.

Zhou et al. 2004 ("Learning with local and global consistency") on a kNN graph with weights
sim^gamma, as Iscen et al. 2019 ("Label propagation for deep semi-supervised learning") run it on
learned features: with a good embedding the unlabelled images of a class form a connected region
of the graph, so a label seeded anywhere in it reaches all of it. The few-label study uses the
propagated labels as the targets of a distilled student (eval.semisup.labelprop), on MoCo's
features and, as the baseline without pre-training, on raw pixels.

Everything stays on the device with static shapes: the graph is k indices and weights per image,
the propagation a fixed number of identical steps (one graph, cut at every step on XLA). Every
replica holds all n features and builds the same graph (n x D floats: MNIST's 60,000 x 512 are
120 MB; ImageNet's 1.28 M x 2048 would be 10 GB, more than a TPU core's memory).
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

SIMILARITIES_AT_ONCE = 1 << 26  # 256 MB of fp32 similarities per chunk of rows


class WithPixels(nn.Module):
    """The graph's features: ``net``'s and the raw pixels', each L2-normalised and scaled so that two
    images' cosine is (1 - weight) x their features' cosine + weight x their pixels'. Where pixel
    distance already means something (small centred digits) the two metrics err on different
    images, and the joint graph propagates better than either (eval.semisup.labelprop.pixel_weight)."""

    def __init__(self, net: nn.Module, weight: float):
        super().__init__()
        self.net, self.weight = net, weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = F.normalize(self.net(x).float(), dim=1) * (1 - self.weight) ** 0.5
        pixels = F.normalize(x.float().flatten(1), dim=1) * self.weight ** 0.5
        return torch.cat([feats, pixels], dim=1)


def graph_features(net: nn.Module, pixel_weight: float) -> nn.Module:
    """``net`` itself at pixel_weight 0, else its features joined with the raw pixels (WithPixels)."""
    return net if pixel_weight == 0 else WithPixels(net, pixel_weight)


def row_chunks(feats: torch.Tensor, columns: int, chunk: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, rows) of ``feats`` ``chunk`` rows at a time (default: as many as keep rows x ``columns``
    similarities within SIMILARITIES_AT_ONCE)."""
    chunk = chunk or max(1, SIMILARITIES_AT_ONCE // columns)
    for start in range(0, feats.shape[0], chunk):
        yield start, feats[start:start + chunk]


def knn_graph(feats: torch.Tensor, k: int, gamma: float, chunk: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, k] neighbour indices, [n, k] weights max(sim, 0)^gamma) of L2-normalised ``feats`` [n, D];
    an image is never its own neighbour. Rows are scored ``chunk`` at a time (default: as many as keep
    chunk x n similarities within SIMILARITIES_AT_ONCE; on XLA a shorter last chunk compiles once more)."""
    n = feats.shape[0]
    k = min(k, n - 1)
    idx, weights = [], []
    for start, rows in row_chunks(feats, n, chunk):
        sim = rows @ feats.t()
        own = torch.arange(start, start + len(sim), device=feats.device)
        sim = sim.scatter(1, own.unsqueeze(1), -2.0)  # below any cosine similarity
        w, i = sim.topk(k, dim=1)
        idx.append(i)
        weights.append(w.clamp(min=0) ** gamma)
    return torch.cat(idx), torch.cat(weights)


def symmetric_product(idx: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(A + A^T) @ g for the sparse kNN adjacency A (row i: weights ``w[i]`` at columns ``idx[i]``):
    the graph is made symmetric, as label propagation needs, without an n x n matrix."""
    out = (w.unsqueeze(-1) * g[idx]).sum(dim=1)                                   # A g
    spread = (w.unsqueeze(-1) * g.unsqueeze(1)).flatten(0, 1)                      # A^T g: row i sends
    return out.index_add(0, idx.flatten(), spread)                                # w_ij g_i to j


def propagate(feats: torch.Tensor, seeds: torch.Tensor, seed_labels: torch.Tensor, classes: int, k: int,
              alpha: float, iterations: int, gamma: float = 3.0,
              mark_step: Callable[[], None] = lambda: None) -> torch.Tensor:
    """[n] labels for all of ``feats`` (L2-normalised [n, D]) from the rows ``seeds`` labelled ``seed_labels``.

    Iterates F <- alpha S F + (1 - alpha) Y with S = D^-1/2 W D^-1/2, W the symmetric kNN graph and
    Y the one-hot seeds; F approaches (1 - alpha)(I - alpha S)^-1 Y, the closed form, as alpha^t. The
    seeds keep their own labels; an image no seed reaches within ``iterations`` steps of the graph
    (a component of its own) takes the label of its most similar seed instead of an arbitrary class.
    ``mark_step`` runs after every iteration (XLA: one cached graph).
    """
    idx, w = knn_graph(feats, k, gamma)
    n = feats.shape[0]
    degree = symmetric_product(idx, w, torch.ones(n, 1, device=feats.device))
    scale = degree.clamp(min=1e-12).rsqrt()                                       # D^-1/2, [n, 1]
    y = torch.zeros(n, classes, device=feats.device).index_put((seeds, seed_labels),
                                                               torch.ones(len(seeds), device=feats.device))
    f = y
    for _ in range(iterations):
        f = alpha * scale * symmetric_product(idx, w, scale * f) + (1 - alpha) * y
        mark_step()
    seed_feats = feats[seeds].t()
    nearest_seed = seed_labels[torch.cat([(rows @ seed_feats).argmax(dim=1)
                                          for _, rows in row_chunks(feats, len(seeds))])]
    labels = torch.where(f.sum(dim=1) > 0, f.argmax(dim=1), nearest_seed)
    return labels.index_put((seeds,), seed_labels)
