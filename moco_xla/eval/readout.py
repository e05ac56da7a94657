"""Which features of a MoCo v1/v2 query encoder the kNN reads (``eval.knn_layer``).

- ``backbone``: the pooled backbone features, what the official kNN monitor and lincls read.
- ``mlp_hidden``: the projection MLP's hidden layer, after its ReLU: between the backbone and the
  low-dimensional output the contrastive loss sees (docs/digits.md compares the two on the digits).

During pre-training the readout shares the encoder's modules, so the monitor reads the current
weights; the eval command rebuilds the same layers from a checkpoint (``Encoders.knn_features``).
"""
from __future__ import annotations

import torch.nn as nn

from ..errors import UserError

HIDDEN_PREFIX = "encoder_q.head.0."  # the MLP's first Linear in a MoCo v1/v2 state dict


def knn_readout(encoder: nn.Module, layer: str) -> nn.Module:
    """``encoder`` (models.Encoder: backbone, then head) up to ``layer``, sharing its modules."""
    if layer == "backbone":
        return encoder.backbone
    return nn.Sequential(encoder.backbone, *hidden_layers(encoder.head)).train(encoder.training)


def hidden_layers(head: nn.Module) -> list[nn.Module]:
    """The projection MLP's first Linear and its ReLU (a v2 head: Linear, ReLU, Linear)."""
    if not (isinstance(head, nn.Sequential) and isinstance(head[0], nn.Linear) and isinstance(head[1], nn.ReLU)):
        raise UserError("eval.knn_layer=mlp_hidden needs a MoCo v2 MLP head (model.mlp true); valid: backbone")
    return [head[0], head[1]]


def hidden_from_state(model_state: dict, source: str) -> nn.Sequential:
    """The projection MLP's first Linear and ReLU, read from a MoCo v1/v2 checkpoint's state dict."""
    weight, bias = model_state.get(HIDDEN_PREFIX + "weight"), model_state.get(HIDDEN_PREFIX + "bias")
    if weight is None or bias is None or weight.dim() != 2:
        raise UserError(f"checkpoint {source} holds no MLP head ({HIDDEN_PREFIX}weight): "
                        "eval.knn_layer=mlp_hidden needs a MoCo v2 encoder; valid: backbone")
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    linear.load_state_dict({"weight": weight, "bias": bias})
    return nn.Sequential(linear, nn.ReLU())
