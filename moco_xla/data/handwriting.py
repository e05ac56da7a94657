"""Augmentations that model handwriting, for MoCo on grey digits (presets ``handwriting`` and
``handwriting_crop`` of ``data.augment``).

Two views of a digit should differ the way two people's (or one person's two) strokes of it differ:
- a small affine warp: slant (shear), rotation, position and size of the pen's whole movement;
- elastic distortion (Simard, Steinkraus and Platt, ICDAR 2003): a random displacement field,
  smoothed by a Gaussian of width sigma and scaled by alpha, warps the strokes locally
  (Simard's 28-px setting scaled to the image size);
- stroke width: a thicker or thinner pen, grey-scale dilation or erosion (3x3 max-pool of the
  image or of its negative) blended in at a random strength;
- random erasing: a missing piece of a stroke.
``handwriting_crop`` puts the digits preset's random resized crop and blur in front of them.

Ops run on one image [C, H, W] (bright strokes on a dark background, as in MNIST and the
scikit-learn digits) and draw their randomness from torch's global generator, as torchvision's do,
so a DataLoader worker's seed makes them reproducible.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

PRESETS = ("handwriting", "handwriting_crop")

SIMARD_SIZE, SIMARD_SIGMA, SIMARD_ALPHA = 28, 4.0, 34.0  # Simard et al.'s elastic setting for 28-29 px digits


def dilate(img: torch.Tensor) -> torch.Tensor:
    """Grey-scale dilation with a 3x3 square: every pixel becomes its neighbourhood's maximum (thicker strokes)."""
    return F.max_pool2d(img.unsqueeze(0), 3, stride=1, padding=1).squeeze(0)


def erode(img: torch.Tensor) -> torch.Tensor:
    """Grey-scale erosion with a 3x3 square: the neighbourhood's minimum (thinner strokes)."""
    return -dilate(-img)


class StrokeWidth(torch.nn.Module):
    """A thicker pen with probability ``p_thicker``, a thinner one with ``p_thinner``: the image blended
    towards its dilation or erosion at a strength drawn uniformly from ``strength``. Float images."""

    def __init__(self, p_thicker: float = 0.25, p_thinner: float = 0.25,
                 strength: tuple[float, float] = (0.5, 1.0)) -> None:
        super().__init__()
        self.p_thicker, self.p_thinner, self.strength = p_thicker, p_thinner, strength

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        u, s = torch.rand(2).tolist()
        if u >= self.p_thicker + self.p_thinner:
            return img
        plain = img.as_subclass(torch.Tensor)
        target = dilate(plain) if u < self.p_thicker else erode(plain)
        lo, hi = self.strength
        out = torch.lerp(plain, target, lo + (hi - lo) * s)
        return tv_tensors.wrap(out, like=img) if isinstance(img, tv_tensors.Image) else out

    def extra_repr(self) -> str:
        return f"p_thicker={self.p_thicker}, p_thinner={self.p_thinner}, strength={self.strength}"


class ElasticDistortion(torch.nn.Module):
    """Simard et al.'s elastic distortion, with probability ``p``, on a float image: a displacement field
    uniform in [-1, 1] per pixel and axis, smoothed by a Gaussian of width ``sigma`` px and scaled by
    ``alpha`` px, resamples the image bilinearly. Simard's 28-px setting (alpha 34, sigma 4: about 1.4 px
    of local displacement) scales with the image side. torchvision's ElasticTransform draws the same
    field but blurs it with an 8-sigma 2-D kernel, 100 x slower on a 28-px digit than this separable one."""

    def __init__(self, size: int, p: float = 0.5) -> None:
        super().__init__()
        scale = size / SIMARD_SIZE
        self.p, self.sigma, self.alpha = p, SIMARD_SIGMA * scale, SIMARD_ALPHA * scale
        radius = min(int(3 * self.sigma + 0.5), size - 1)  # reflect padding needs radius < side
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-x ** 2 / (2 * self.sigma ** 2))
        self.register_buffer("kernel", kernel / kernel.sum(), persistent=False)

    def field(self, h: int, w: int) -> torch.Tensor:
        """Displacements [1, H, W, 2] in pixels (x, y)."""
        f = torch.rand(2, 1, h, w) * 2 - 1
        r = self.kernel.numel() // 2
        f = F.conv2d(F.pad(f, (r, r, 0, 0), mode="reflect"), self.kernel.view(1, 1, 1, -1))
        f = F.conv2d(F.pad(f, (0, 0, r, r), mode="reflect"), self.kernel.view(1, 1, -1, 1))
        return (f * self.alpha).permute(1, 2, 3, 0)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if float(torch.rand(())) >= self.p:
            return img
        plain = img.as_subclass(torch.Tensor)
        h, w = plain.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        pos = torch.stack([xs, ys], dim=-1).unsqueeze(0) + self.field(h, w)
        grid = (2 * pos + 1) / torch.tensor([w, h], dtype=torch.float32) - 1  # pixel centres, align_corners False
        out = F.grid_sample(plain.unsqueeze(0), grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False).squeeze(0)
        return tv_tensors.wrap(out, like=img) if isinstance(img, tv_tensors.Image) else out

    def extra_repr(self) -> str:
        return f"p={self.p}, alpha={self.alpha:.3g}, sigma={self.sigma:.3g}"


def handwriting_ops(preset: str, size: int, blur_k: int, scale: tuple[float, float]) -> tuple[list, list]:
    """(ops on the uint8 image, ops on the float image in [0, 1]) of a handwriting preset, in order:
    crop (``scale``: transforms.crop_scale) and blur (handwriting_crop), affine warp; elastic distortion,
    stroke width, erasing."""
    if preset not in PRESETS:
        raise ValueError(f"unknown handwriting augment {preset!r}; valid: {', '.join(PRESETS)}")
    if preset == "handwriting_crop":
        geometric = [v2.RandomResizedCrop(size, scale=scale, ratio=(0.8, 1.25), antialias=True),
                     v2.RandomApply([v2.GaussianBlur(blur_k, sigma=(0.1, 1.0))], p=0.5)]
    else:  # the whole digit, at the model's size (as evaluation sees it)
        geometric = [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    geometric.append(v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=10))
    pen = [ElasticDistortion(size), StrokeWidth(), v2.RandomErasing(p=0.25, scale=(0.02, 0.1), ratio=(0.5, 2.0), value=0)]
    return geometric, pen
