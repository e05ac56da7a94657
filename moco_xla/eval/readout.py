"""Which features of a MoCo v1/v2 encoder the kNN reads (``eval.knn_encoder``, ``eval.knn_layer``).

Layers (``eval.knn_layer``):
- ``backbone``: the pooled backbone features, what the official kNN monitor and lincls read.
- ``mlp_hidden``: the projection MLP's hidden layer, after its ReLU: between the backbone and the
  low-dimensional output the contrastive loss sees.
- ``projection``: the head's output, the space in which the loss compares queries and keys.

Encoders (``eval.knn_encoder``): ``query``, the encoder SGD trains, or ``key``, its momentum
average (the "teacher" that DINO and BYOL evaluate). docs/digits.md compares them on the digits.

During pre-training the readout shares the encoder's modules, so the monitor reads the current
weights; the eval command builds the same encoder from a checkpoint (``Encoders.knn_features``)
and takes the same readout of it.
"""
from __future__ import annotations

import torch.nn as nn

from ..errors import UserError

def knn_readout(encoder: nn.Module, layer: str) -> nn.Module:
    """``encoder`` (backbone, then head) up to ``layer``, sharing its modules."""
    if layer == "backbone":
        return encoder.backbone
    if layer == "projection":
        return encoder
    return nn.Sequential(encoder.backbone, *hidden_layers(encoder.head)).train(encoder.training)


def hidden_layers(head: nn.Module) -> list[nn.Module]:
    """The projection MLP's first Linear and its ReLU (a v2 head: Linear, ReLU, Linear)."""
    if not (isinstance(head, nn.Sequential) and isinstance(head[0], nn.Linear) and isinstance(head[1], nn.ReLU)):
        raise UserError("eval.knn_layer=mlp_hidden needs a MoCo v2 MLP head (model.mlp true); valid: backbone")
    return [head[0], head[1]]


def encoder_prefix(knn_encoder: str) -> str:
    """Where ``eval.knn_encoder``'s weights sit in a MoCo state dict."""
    return {"query": "encoder_q.", "key": "encoder_k."}[knn_encoder]
