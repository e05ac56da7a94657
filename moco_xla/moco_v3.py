"""MoCo v3: a base encoder with projector and predictor, a momentum encoder, the batch as negatives.

Read alongside the official builder (facebookresearch/moco-v3, moco/builder.py) and main_moco.py:
the same steps under the paper's names (``encoder_q`` is the paper's base encoder, ``encoder_k``
its momentum encoder; the names of moco.py, so the kNN monitor, the probes and the exporter read
``encoder_q.backbone`` for every version). What differs is what a TPU needs:

- the keys are gathered through the Runtime (no gradient through them), and the positives sit at
  ``arange(B) + rank * B`` with the rank a device tensor (``rt.rank_index``): every replica runs
  the same XLA graph;
- the MLPs' BN is the Runtime's SyncBatchNorm (statistics over the global batch on XLA, NCCL and
  gloo alike; torch.nn.SyncBatchNorm is CUDA-only);
- logits, softmax and loss are fp32 under bf16 autocast;
- the momentum ``m`` is a Python float set once per step (``set_momentum``): torch_xla passes such
  a scalar to the graph as data, so the cosine schedule recompiles nothing (never exactly 0 or 1,
  the two values it would bake in as constants).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck

from .models import SyncBatchNorm, build_backbone, norm_layer
from .runtime import Runtime
from .vit import build_vit, is_vit


class SyncBatchNorm1d(SyncBatchNorm):
    """BatchNorm1d over the global batch through the Runtime (the MLP heads' BN)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 4:  # forward hands the [N, C] input on as [N, C, 1, 1]
            raise ValueError(f"expected a 2-D input, got {input.dim() - 2}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"SyncBatchNorm1d expects [N, C], got shape {tuple(x.shape)}")
        return super().forward(x[:, :, None, None]).flatten(1)


def build_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, runtime: Runtime,
              last_bn: bool = True) -> nn.Sequential:
    """builder.py's _build_mlp: Linear (no bias), BN, ReLU per hidden layer; BN without affine last."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = input_dim if i == 0 else mlp_dim
        d_out = output_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [SyncBatchNorm1d(d_out, runtime=runtime), nn.ReLU(inplace=True)]
        elif last_bn:  # SimCLR's design, without the BN's gamma (as in the official code)
            layers.append(SyncBatchNorm1d(d_out, runtime=runtime, affine=False))
    return nn.Sequential(*layers)


class ProjectedEncoder(nn.Module):
    """Backbone plus projection MLP (the official code puts the projector in place of fc / head)."""

    def __init__(self, backbone: nn.Module, feat_dim: int, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head, self.feat_dim = backbone, head, feat_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def momentum_at(m: float, progress: float) -> float:
    """main_moco.py's adjust_moco_momentum: m rises to 1 on a half cosine; progress in [0, 1)."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - m)


class MoCoV3(nn.Module):
    """MoCo v3. ``forward(x1, x2)`` returns (loss, {'loss', 'acc'}), all device tensors."""

    def __init__(self, encoder_q: ProjectedEncoder, predictor: nn.Module, runtime: Runtime,
                 T: float = 0.2, m: float = 0.99, global_batch: int = 4096) -> None:
        super().__init__()
        self.rt, self.T, self.base_m, self.m = runtime, T, m, m
        self.global_batch = global_batch
        self.encoder_q = encoder_q
        self.predictor = predictor
        self.encoder_k = copy.deepcopy(encoder_q)  # same init; trained only by momentum
        for p in self.encoder_k.parameters():
            p.requires_grad = False

    def set_momentum(self, m: float) -> None:
        """The momentum of the next step's update (the schedule sets it every step)."""
        self.m = m

    @torch.no_grad()
    def momentum_update_key_encoder(self) -> None:
        """theta_k <- m * theta_k + (1 - m) * theta_q, as one fused foreach op."""
        k_params = list(self.encoder_k.parameters())
        q_params = [p.detach() for p in self.encoder_q.parameters()]
        torch._foreach_lerp_(k_params, q_params, 1.0 - self.m)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.encoder_q(x))

    @torch.no_grad()
    def key(self, x: torch.Tensor) -> torch.Tensor:
        """This replica's keys from the momentum encoder, L2-normalised in fp32."""
        return F.normalize(self.encoder_k(x).float(), dim=1)

    def logits(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N] logits of the local queries against every replica's keys, and the positives' columns."""
        q = F.normalize(q.float(), dim=1)
        keys = self.rt.all_gather(k.detach())  # the whole global batch of keys are the negatives
        b = q.shape[0]
        labels = torch.arange(b, device=q.device) + self.rt.rank_index * b
        with torch.autocast(q.device.type, enabled=False):
            return self.rt.precise_matmul(q, keys.t()) / self.T, labels  # TPU: highest precision

    def contrastive_loss(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE scaled by 2T (builder.py: the gradient's scale no longer depends on T)."""
        logits, labels = self.logits(q, k)
        with torch.autocast(logits.device.type, enabled=False):
            loss = F.cross_entropy(logits, labels) * (2 * self.T)
            acc = (logits.argmax(dim=1) == labels).float().mean()
        return loss, acc

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, dict]:
        q1, q2 = self.query(x1), self.query(x2)
        self.momentum_update_key_encoder()
        k1, k2 = self.key(x1), self.key(x2)
        loss_12, acc_12 = self.contrastive_loss(q1, k2)
        loss_21, acc_21 = self.contrastive_loss(q2, k1)
        loss, acc = loss_12 + loss_21, (acc_12 + acc_21) / 2
        return loss, {"loss": loss.detach(), "acc": acc.detach()}

    def uniform_loss(self) -> float:
        """The loss of uniform logits, 2T ln(N) per direction: where a collapsed run sits."""
        return 2 * 2 * self.T * math.log(self.global_batch)


def zero_init_residual(net: nn.Module) -> None:
    """torchvision's zero_init_residual (main_moco.py builds its ResNets with it): each block's
    last BN starts at gamma 0, so every residual block starts as the identity."""
    for module in net.modules():
        if isinstance(module, Bottleneck):
            nn.init.zeros_(module.bn3.weight)
        elif isinstance(module, BasicBlock):
            nn.init.zeros_(module.bn2.weight)


def build_moco_v3(cfg, rt: Runtime) -> MoCoV3:
    """MoCo v3 from the config: ResNet (2-layer projector, predictor without last BN) or ViT
    (3-layer projector, predictor with last BN), as builder.py's MoCo_ResNet and MoCo_ViT."""
    m, v = cfg.model, cfg.moco
    vit = is_vit(m.arch)
    if vit:
        backbone, feat_dim = build_vit(m.arch, cfg.data.image_size, m.patch_size, m.in_channels, m.width,
                                       m.stop_grad_conv1)
    else:
        backbone, feat_dim = build_backbone(m.arch, m.in_channels, m.small_stem, m.width,
                                            norm_layer(m.bn_splits, m.sync_bn, rt), m.depth)
        zero_init_residual(backbone)
    proj_layers = v.proj_layers or (3 if vit else 2)
    projector = build_mlp(proj_layers, feat_dim, v.mlp_dim, m.dim, rt)
    predictor = build_mlp(2, m.dim, v.mlp_dim, m.dim, rt, last_bn=vit)
    return MoCoV3(ProjectedEncoder(backbone, feat_dim, projector), predictor, rt, v.T, v.m,
                  cfg.train.batch_size)
