"""Which features of a MoCo v1/v2 encoder the kNN reads (``eval.knn_encoder``, ``eval.knn_layer``).

Layers (``eval.knn_layer``):
- ``backbone``: the pooled backbone features, what the official kNN monitor and lincls read.
- ``mlp_hidden``: the projection MLP's hidden layer, after its ReLU: between the backbone and the
  low-dimensional output the contrastive loss sees.
- ``projection``: the head's output, the space in which the loss compares queries and keys.

Encoders (``eval.knn_encoder``): ``query``, the encoder SGD trains, ``key``, its momentum
average (the "teacher" that DINO and BYOL evaluate), or ``averaged``, the uniform average of its
weights at the ends of the last epochs (``train.average_from``; averaging.py). docs/digits.md
compares them on the digits.

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


def monitored_encoder(model: nn.Module, knn_encoder: str, averaged_yet: bool) -> nn.Module:
    """The encoder ``eval.knn_encoder`` names in a pre-training MoCo; ``averaged`` before the first
    averaged epoch (``averaged_yet`` false) is the query encoder, which it will average."""
    if knn_encoder == "averaged":
        return model.encoder_avg.encoder if averaged_yet else model.encoder_q
    return model.encoder_q if knn_encoder == "query" else model.encoder_k


def encoder_prefix(knn_encoder: str) -> str:
    """Where ``eval.knn_encoder``'s weights sit in a MoCo state dict."""
    return {"query": "encoder_q.", "key": "encoder_k.", "averaged": "encoder_avg.encoder."}[knn_encoder]
