"""Vision Transformers for MoCo v3, built from torchvision's VisionTransformer with v3's choices.

Read alongside facebookresearch/moco-v3 vits.py (which builds on timm): the same three
changes to a plain ViT, here on torchvision's module so that the state dict is torchvision's
``vit_b_16`` layout (``export.py`` maps it to timm's):

- a fixed 2-D sin-cos position embedding (kept as a frozen parameter: same state-dict key);
- a frozen random patch projection (``stop_grad_conv1``): the paper's fix for the training
  instability of ViTs, where the first layer's gradient spikes before the loss does;
- the class token's output (after the final LayerNorm) is the feature.

``vit_small`` is MoCo v3's ViT-S (12 heads, where timm's and DeiT's ViT-S have 6), ``vit_base``
ViT-B/16; ``small_vit`` a 4-block ViT of width ``model.width`` for 16 px digits on a CPU.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
from torchvision.models.vision_transformer import VisionTransformer

# arch: (hidden_dim, depth, heads); small_vit's width comes from model.width
VIT_ARCHS = {"vit_small": (384, 12, 12), "vit_base": (768, 12, 12), "small_vit": (None, 4, 4)}


def is_vit(arch: str) -> bool:
    return arch in VIT_ARCHS


def vit_dims(arch: str, width: int) -> tuple[int, int, int]:
    """(hidden_dim, depth, heads) of a ViT arch."""
    dim, depth, heads = VIT_ARCHS[arch]
    return (dim or width), depth, heads


def sincos_position_embedding(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """[1, 1 + grid*grid, dim]: the class token's zeros, then moco-v3's 2-D sin-cos code per patch.

    The same numbers as vits.py's build_2d_sincos_position_embedding (meshgrid in 'ij' order).
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="ij")
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    out_w = grid_w.flatten()[:, None] * omega[None]
    out_h = grid_h.flatten()[:, None] * omega[None]
    pe = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), pe])[None]


class MoCoViT(VisionTransformer):
    """torchvision's VisionTransformer with moco-v3's position embedding, init and frozen patch projection.

    ``forward`` returns the class token's feature [B, hidden_dim] (``heads`` is an Identity).
    """

    def __init__(self, image_size: int, patch_size: int, hidden_dim: int, depth: int, heads: int,
                 in_channels: int = 3, stop_grad_conv1: bool = True) -> None:
        super().__init__(image_size, patch_size, depth, heads, hidden_dim, 4 * hidden_dim,
                         norm_layer=partial(nn.LayerNorm, eps=1e-6))
        if in_channels != 3:
            self.conv_proj = nn.Conv2d(in_channels, hidden_dim, patch_size, patch_size)
        self.heads = nn.Identity()
        self.out_dim = hidden_dim
        pe = sincos_position_embedding(image_size // patch_size, hidden_dim)
        self.encoder.pos_embedding = nn.Parameter(pe, requires_grad=False)
        self._init_weights(in_channels, patch_size)
        if stop_grad_conv1:
            self.conv_proj.weight.requires_grad_(False)
            self.conv_proj.bias.requires_grad_(False)

    @torch.no_grad()
    def _init_weights(self, in_channels: int, patch_size: int) -> None:
        """vits.py's init: xavier-uniform linears (q, k and v each on its own), zero biases,
        cls token N(0, 1e-6), xavier-uniform patch projection."""
        for module in self.modules():
            if isinstance(module, nn.MultiheadAttention):
                d = module.embed_dim
                val = math.sqrt(6.0 / (d + d))  # qkv weight [3d, d] treated as three [d, d]
                nn.init.uniform_(module.in_proj_weight, -val, val)
                nn.init.zeros_(module.in_proj_bias)
            elif isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.class_token, std=1e-6)
        val = math.sqrt(6.0 / (in_channels * patch_size * patch_size + self.hidden_dim))
        nn.init.uniform_(self.conv_proj.weight, -val, val)
        nn.init.zeros_(self.conv_proj.bias)


def build_vit(arch: str, image_size: int, patch_size: int = 16, in_channels: int = 3, width: int = 64,
              stop_grad_conv1: bool = True) -> tuple[MoCoViT, int]:
    """A ViT backbone and its feature width (the class token's)."""
    if arch not in VIT_ARCHS:
        raise ValueError(f"unknown ViT arch {arch!r}; valid: {', '.join(VIT_ARCHS)}")
    dim, depth, heads = vit_dims(arch, width)
    net = MoCoViT(image_size, patch_size, dim, depth, heads, in_channels, stop_grad_conv1)
    return net, dim
