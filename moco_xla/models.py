"""Encoders: torchvision ResNets, a small-image stem, a small ResNet for CPUs, and the BN variants.

Batch norm is where MoCo cheats if you let it: with plain BN on one device the
query and its positive key share batch statistics and the model learns to read
them instead of the image. ``SplitBatchNorm`` (one device) and shuffle BN
(several replicas, in moco.py) close that leak; ``SyncBatchNorm`` is the option
that normalises over the global batch through the runtime's all_reduce.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock

from .runtime import Runtime

ARCHS = ("resnet18", "resnet34", "resnet50", "small_resnet")


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics come from ``num_splits`` sub-batches.

    Sub-batch j is the contiguous slice of samples ``j * n/g .. (j + 1) * n/g - 1``, viewed
    as ``(g, n/g, c, h, w)``: a view on every device, where folding the batch into the
    channels (the official CIFAR-10 demo's ``reshape(-1, c * g, h, w)``) is a relayout copy
    per BN layer in a TPU's tiled layout. This simulates multi-device BN on one device;
    the key batch is permuted before the key encoder (shuffle.py), so the sub-batches the
    keys are normalised in are not the queries' ones. Statistics are computed in fp32; the
    running statistics are the average over sub-batches, in BatchNorm2d's layout (``c``).
    """

    def __init__(self, num_features: int, num_splits: int, **kw) -> None:
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        return self._per_slice(x) if x.device.type == "cpu" else self._grouped(x)

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """All sub-batches at once through a [g, n/g, c, h, w] view: one graph of a few ops (XLA, CUDA)."""
        n, c, h, w = x.shape
        g = self.num_splits
        groups = x.reshape(g, n // g, c, h, w).float()
        var, mean = torch.var_mean(groups, dim=(1, 3, 4), unbiased=False, keepdim=True)  # [g, 1, c, 1, 1]
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale = scale * self.weight.view(1, 1, c, 1, 1)
            shift = shift * self.weight.view(1, 1, c, 1, 1) + self.bias.view(1, 1, c, 1, 1)
        if self.track_running_stats:
            self._track(mean.detach(), var.detach(), (n // g) * h * w)
        return (groups * scale + shift).to(x.dtype).reshape(n, c, h, w)

    def _per_slice(self, x: torch.Tensor) -> torch.Tensor:
        """Each sub-batch (a contiguous slice) through torch's fused batch norm, then one concatenation:
        the same normalisation as ``_grouped``, for less CPU (one fused kernel forward and backward
        where ``_grouped`` runs several elementwise ops and their gradients)."""
        n, c, h, w = x.shape
        g = self.num_splits
        outs, means, invstds = [], [], []
        for part in x.chunk(g):
            out, mean, invstd = torch.native_batch_norm(part, self.weight, self.bias, None, None, True, 0.0,
                                                        self.eps)
            outs.append(out)
            means.append(mean)
            invstds.append(invstd)
        if self.track_running_stats:
            var = torch.stack(invstds).detach().float().pow(-2) - self.eps
            self._track(torch.stack(means).detach().float(), var, (n // g) * h * w)
        return torch.cat(outs)

    @torch.no_grad()
    def _track(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """running <- (1 - momentum) running + momentum * (the sub-batches' mean statistic), as
        BatchNorm2d per sub-batch then averaged; the variance unbiased over one sub-batch."""
        unbiased = var * (count / max(count - 1, 1))
        self.running_mean.lerp_(mean.mean(dim=0).reshape(-1), self.momentum)
        self.running_var.lerp_(unbiased.mean(dim=0).reshape(-1), self.momentum)


class _AllReduceSum(torch.autograd.Function):
    """all_reduce(sum) whose gradient is the all_reduce(sum) of the incoming gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rt: Runtime) -> torch.Tensor:
        ctx.rt = rt
        return rt.all_reduce(x, op="sum")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.rt.all_reduce(grad, op="sum"), None


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm over the global batch, with statistics summed through the Runtime.

    Works the same on XLA, NCCL and gloo (torch.nn.SyncBatchNorm is CUDA-only).
    """

    def __init__(self, num_features: int, runtime: Runtime, **kw) -> None:
        super().__init__(num_features, **kw)
        self.runtime = runtime

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.runtime.world_size == 1:
            return super().forward(x)
        c = x.shape[1]
        count = x.numel() / c * self.runtime.world_size
        xf = x.float()  # statistics in fp32 under bf16/fp16 autocast (E[x^2] - E[x]^2 cancels)
        stats = torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3))])
        stats = _AllReduceSum.apply(stats, self.runtime)
        mean = stats[:c] / count
        var = stats[c:] / count - mean * mean
        with torch.no_grad():
            unbiased = var * count / max(count - 1, 1)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(unbiased.detach(), self.momentum)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:  # affine=False: MoCo v3's last projector BN
            scale = self.weight * scale
        shift = -mean * scale if self.bias is None else self.bias - mean * scale
        return (xf * scale.view(1, c, 1, 1) + shift.view(1, c, 1, 1)).to(x.dtype)


def norm_layer(bn_splits: int = 1, sync: bool = False, runtime: Runtime | None = None
               ) -> Callable[[int], nn.Module]:
    """The BN constructor for the encoders: plain, split (G sub-batches) or sync."""
    if sync:
        if runtime is None:
            raise ValueError("SyncBatchNorm needs a runtime")
        return partial(SyncBatchNorm, runtime=runtime)
    if bn_splits > 1:
        return partial(SplitBatchNorm, num_splits=bn_splits)
    return nn.BatchNorm2d


class SmallResNet(nn.Module):
    """A ResNet with ``depth`` BasicBlocks per stage (widths w, 2w, 4w, 8w) for small images on CPUs.

    About 1.2 M parameters at width 32 and depth 1; trains at hundreds of 16x16 images/s on two cores.
    """

    def __init__(self, in_channels: int = 1, width: int = 32,
                 norm: Callable[[int], nn.Module] = nn.BatchNorm2d, depth: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        layers, inplanes = [], width
        for i, planes in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), norm(planes))
            layers.append(BasicBlock(inplanes, planes, stride, down, norm_layer=norm))
            layers += [BasicBlock(planes, planes, norm_layer=norm) for _ in range(depth - 1)]
            inplanes = planes
        self.layers = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = inplanes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return torch.flatten(self.avgpool(self.layers(x)), 1)


def build_backbone(arch: str, in_channels: int = 3, small_stem: bool = False, width: int = 32,
                   norm: Callable[[int], nn.Module] = nn.BatchNorm2d, depth: int = 1) -> tuple[nn.Module, int]:
    """A backbone that maps images to pooled features, and the feature width (``width``, ``depth``:
    small_resnet's)."""
    if arch == "small_resnet":
        net = SmallResNet(in_channels, width, norm, depth)
        return net, net.out_dim
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    net = getattr(torchvision.models, arch)(weights=None, norm_layer=norm)
    if small_stem:  # 28-32 px images: 3x3 stride-1 stem, no max-pool
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feat_dim


class Encoder(nn.Module):
    """Backbone plus projection head (v1: one linear layer; v2: a 2-layer MLP)."""

    def __init__(self, backbone: nn.Module, feat_dim: int, dim: int = 128, mlp: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        if mlp:
            self.head = nn.Sequential(nn.Linear(feat_dim, feat_dim), nn.ReLU(inplace=True),
                                      nn.Linear(feat_dim, dim))
        else:
            self.head = nn.Linear(feat_dim, dim)
        self.feat_dim = feat_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


RESNETS = ("resnet18", "resnet34", "resnet50", "small_resnet")


def use_channels_last(model_cfg, device: torch.device) -> bool:
    """``model.channels_last`` on this device: null means CUDA only (cuDNN's NHWC kernels; no
    gain measured on CPU), true also CPU (oneDNN); never on XLA, whose compiler picks layouts."""
    if device.type not in ("cuda", "cpu") or model_cfg.arch not in RESNETS:
        return False
    flag = getattr(model_cfg, "channels_last", None)
    return device.type == "cuda" if flag is None else bool(flag)


def to_channels_last(module: nn.Module, model_cfg, device: torch.device) -> bool:
    """Convert ``module``'s 4-D weights to channels-last in place where ``use_channels_last``
    says so; the convolutions then run NHWC (their input follows the weight). Parameters stay the
    same objects, so optimizers and momentum copies built before or after keep working."""
    if not use_channels_last(model_cfg, device):
        return False
    module.to(memory_format=torch.channels_last)
    return True


def build_encoder(model_cfg, runtime: Runtime | None = None) -> Encoder:
    """An Encoder from the config's ``model`` section."""
    norm = norm_layer(model_cfg.bn_splits, model_cfg.sync_bn, runtime)
    backbone, feat_dim = build_backbone(model_cfg.arch, model_cfg.in_channels, model_cfg.small_stem,
                                        model_cfg.width, norm, model_cfg.depth)
    return Encoder(backbone, feat_dim, model_cfg.dim, model_cfg.mlp)
