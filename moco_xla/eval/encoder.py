"""The encoder under evaluation: a checkpoint's query backbone, read once per command.

``Encoders`` reads the checkpoint once and hands every row of a study its own deep copy, on the
device and in eval mode, beside the same architecture freshly initialised with the config's seed
(the baselines without pre-training). Both are built from the one config the command runs with,
so the pre-trained and random rows cannot disagree about the model. The kNN command reads the
encoder and layer ``eval.knn_encoder`` and ``eval.knn_layer`` name, as the training monitor does.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..checkpoint import load_checkpoint
from ..config import Config, from_dict
from ..errors import UserError
from ..models import Encoder, build_backbone
from ..runtime import Runtime
from .readout import encoder_prefix, knn_readout
from ..vit import build_vit, is_vit

BACKBONE_PREFIX = "encoder_q.backbone."


def build_eval_backbone(cfg: Config) -> tuple[nn.Module, int]:
    """The config's backbone with plain BN (Split/Sync BN only matter while pre-training)."""
    m = cfg.model
    if is_vit(m.arch):  # MoCo v3's ViTs (no BN in the backbone)
        return build_vit(m.arch, cfg.data.image_size, m.patch_size, m.in_channels, m.width, m.stop_grad_conv1)
    return build_backbone(m.arch, m.in_channels, m.small_stem, m.width, nn.BatchNorm2d, m.depth)


def load_encoder(ckpt_path: str) -> tuple[Config, nn.Module]:
    """(config it was trained with, query backbone on the CPU) of a checkpoint, local or gs://."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = from_dict(ckpt["config"])
    backbone, _ = build_eval_backbone(cfg)
    load_weights(backbone, ckpt["model"], BACKBONE_PREFIX, ckpt_path)
    return cfg, backbone


def load_weights(module: nn.Module, model_state: dict, prefix: str, source: str) -> None:
    """Copy ``prefix*`` of a MoCo state dict (e.g. ``encoder_q.backbone.``) into ``module``; UserError
    on mismatch."""
    state = {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}
    if not state:
        raise UserError(f"checkpoint {source} holds no {prefix}* weights: not a MoCo encoder")
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"checkpoint {source} does not fit the configured model ({first}); "
                        f"leave model.* as the checkpoint has it") from None


class Encoders:
    """The checkpoint's backbone (read on first use, once) and a seeded random one, copied per use."""

    def __init__(self, cfg: Config, ckpt: str) -> None:
        self.cfg, self.ckpt = cfg, ckpt
        self._state: dict | None = None  # the checkpoint's model state dict, read once
        self._pretrained: nn.Module | None = None
        self._knn: nn.Module | None = None
        self._random: nn.Module | None = None
        self.dim = build_eval_backbone(cfg)[1]

    def pretrained(self, rt: Runtime) -> nn.Module:
        """A fresh copy of the pre-trained backbone on ``rt``'s device, in eval mode."""
        if self._pretrained is None:
            self._pretrained = self._build()
            load_weights(self._pretrained, self.model_state(), BACKBONE_PREFIX, self.ckpt)
        return copy.deepcopy(self._pretrained).to(rt.device).eval()

    def knn_features(self, rt: Runtime) -> nn.Module:
        """The features the kNN reads, as ``pretrained``: the query, key or averaged encoder (eval.knn_encoder)
        up to eval.knn_layer, built as pre-training built it (backbone, then head)."""
        if self._knn is None:
            m, e = self.cfg.model, self.cfg.eval
            backbone, feat_dim = build_eval_backbone(self.cfg)
            encoder, prefix = Encoder(backbone, feat_dim, m.dim, m.mlp), encoder_prefix(e.knn_encoder)
            if e.knn_encoder == "averaged" and not int(self.model_state().get("encoder_avg.n_averaged", 0)):
                raise UserError(f"checkpoint {self.ckpt} was written before epoch train.average_from="
                                f"{self.cfg.train.average_from}: no weights averaged yet; valid: "
                                "eval.knn_encoder=query or key, or a later checkpoint")
            if e.knn_layer == "backbone":  # the backbone alone: MoCo v3's heads are not models.Encoder's
                load_weights(backbone, self.model_state(), prefix + "backbone.", self.ckpt)
            else:
                load_weights(encoder, self.model_state(), prefix, self.ckpt)
            self._knn = knn_readout(encoder, e.knn_layer)
        return copy.deepcopy(self._knn).to(rt.device).eval()

    def model_state(self) -> dict:
        """The checkpoint's model state dict (read on first use)."""
        if self._state is None:
            self._state = load_checkpoint(self.ckpt)["model"]
        return self._state

    def random(self, rt: Runtime) -> nn.Module:
        """A fresh copy of the backbone initialised with train.seed (identical on every replica)."""
        if self._random is None:
            torch.manual_seed(self.cfg.train.seed)
            self._random = self._build()
        net = copy.deepcopy(self._random).to(rt.device)
        rt.sync_module(net)
        return net

    def _build(self) -> nn.Module:
        return build_eval_backbone(self.cfg)[0]
