"""The per-pixel half of MoCo's augmentation, as batched ops on the accelerator.

The host decodes, crops and resizes each view and ships it as uint8, channels last
([N, H, W, C]: the layout its resize writes; transforms.CropViews); inside the compiled step
``DeviceAugment`` does the rest of the recipe on the batch: the random horizontal flip, the
turn to channels-first, colour jitter (random order of brightness, contrast, saturation, hue)
with probability p, random grayscale, Gaussian blur with a random sigma, and normalisation.
Every sample draws its own parameters from an RNG the checkpoint keeps: on the
device for XLA (``torch.rand`` on the batch's device: no host sync, the same shapes every
step, so XLA compiles the graph once) and the CPU backend; from torch's CPU RNG for CUDA
(whose generator the checkpoint does not hold), copied over with the batch, so a resumed
run draws what an uninterrupted one would. Each op is the torchvision.transforms.v2 op on
float images, written for a batch of per-sample factors. The flip runs first, on the uint8
pixels: the recipe flips last, and a mirror commutes exactly with the colour ops and with the
blur (a symmetric kernel, reflect padding), so the distribution is the recipe's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class DeviceRecipe:
    """One preset's device ops; jitter is (brightness, contrast, saturation, hue) strengths."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    jitter_p: float = 0.0
    gray_p: float = 0.0
    gray_first: bool = False          # MoCo v1 draws grayscale before the jitter
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = 3
    flip_p: float = 0.0              # horizontal flip


def draw_params(recipe: DeviceRecipe, n: int, device, generator: torch.Generator | None = None
                ) -> dict[str, torch.Tensor]:
    """Per-sample random parameters, as torchvision's RandomApply / ColorJitter / RandomGrayscale /
    GaussianBlur / RandomHorizontalFlip draw them: neutral factors (1, 1, 1, 0) where the jitter is
    not applied, sigma 0 where the blur is not."""
    def rand(*shape):
        return torch.rand(*shape, device=device, generator=generator)
    b, c, s, h = recipe.jitter
    on = rand(n) < recipe.jitter_p
    factors = torch.stack([1 + b * (2 * rand(n) - 1), 1 + c * (2 * rand(n) - 1), 1 + s * (2 * rand(n) - 1),
                           h * (2 * rand(n) - 1)], dim=1)
    neutral = torch.tensor([1.0, 1.0, 1.0, 0.0], device=device)
    order = torch.argsort(rand(n, 4), dim=1)  # a uniform random permutation per sample (torch.randperm(4))
    lo, hi = recipe.blur_sigma
    sigma = torch.where(rand(n) < recipe.blur_p, lo + (hi - lo) * rand(n), torch.zeros(n, device=device))
    return {"factors": torch.where(on[:, None], factors, neutral), "order": order,
            "gray": rand(n) < recipe.gray_p, "sigma": sigma, "flip": rand(n) < recipe.flip_p}


def apply(recipe: DeviceRecipe, images: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float32 normalised [N, C, H, W], with the parameters ``p`` (draw_params).
    The flip and the transposition to channels-first are part of the step (fused with the
    conversion to float)."""
    if recipe.flip_p > 0:
        images = torch.where(_per_sample(p["flip"]), images.flip(2), images)
    x = images.permute(0, 3, 1, 2).float() / 255.0
    if x.shape[1] == 3:
        if recipe.gray_first:
            x = _maybe_gray(x, p["gray"])
        if recipe.jitter_p > 0:
            x = jitter(x, p["factors"], p["order"])
        if not recipe.gray_first:
            x = _maybe_gray(x, p["gray"])
    if recipe.blur_p > 0:
        x = gaussian_blur(x, p["sigma"], recipe.blur_kernel)
    mean = torch.tensor(recipe.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(recipe.std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


class DeviceAugment:
    """Called in the step on each view: ``im = augment(im)`` (uint8 [N, H, W, C] in, float32
    normalised [N, C, H, W] out)."""

    def __init__(self, recipe: DeviceRecipe) -> None:
        self.recipe = recipe

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        on_device = images.device.type in ("xla", "cpu")  # RNGs the checkpoint keeps (see the module)
        params = draw_params(self.recipe, images.shape[0], images.device if on_device else "cpu")
        if not on_device:
            params = {k: v.to(images.device, non_blocking=True) for k, v in params.items()}
        return apply(self.recipe, images, params)

    def __repr__(self) -> str:
        return f"DeviceAugment({self.recipe})"


def identity(images: torch.Tensor) -> torch.Tensor:
    """The augment of presets whose views the host finishes (digits): nothing left to do."""
    return images


# ----------------------------------------------------------------------------- the ops, batched

def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend on floats: ratio * a + (1 - ratio) * b, clamped to [0, 1]."""
    r = _per_sample(ratio)
    return (r * a + (1 - r) * b).clamp(0, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """[N, 1, H, W] luma (torchvision's rgb_to_grayscale weights)."""
    w = torch.tensor(GRAY_WEIGHTS, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _maybe_gray(x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    return torch.where(_per_sample(on), grayscale(x).expand_as(x), x)


def hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``shift`` (in turns, -0.5..0.5) through HSV, as torchvision's adjust_hue."""
    h, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb(torch.remainder(h + _per_sample(shift)[:, 0], 1.0), s, v)


def jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """ColorJitter's four ops in each sample's own order (``order[i]`` a permutation of 0..3).

    Brightness, contrast and saturation are each a blend with a target (black, the mean
    gray level, the gray image), so one slot of the order is one blend per sample with that
    sample's target and factor (factor 1, a no-op, where the slot is not active). Static
    shapes: every slot runs on the whole batch; hue (the costly op, index 3) runs once,
    between the slots before and after each sample's hue slot.
    """
    hue_slot = (order == 3).int().argmax(dim=1)
    for before in (True, False):
        for slot in range(4):
            active = hue_slot > slot if before else hue_slot < slot
            x = _blend_slot(x, torch.where(active, order[:, slot], torch.full_like(order[:, slot], -1)), factors)
        if before:
            x = hue(x, factors[:, 3])
    return x


def _blend_slot(x: torch.Tensor, op: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Per sample: brightness (op 0), contrast (1), saturation (2) or nothing (-1, or 3: hue)."""
    gray = grayscale(x)
    target = torch.where(_per_sample(op == 1), gray.mean(dim=(1, 2, 3), keepdim=True),
                         torch.where(_per_sample(op == 2), gray, torch.zeros_like(gray)))
    cheap = (op >= 0) & (op <= 2)
    ratio = torch.where(cheap, factors.gather(1, op.clamp(0, 2).unsqueeze(1)).squeeze(1), torch.ones_like(factors[:, 0]))
    return _blend(x, target, ratio)


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = x.unbind(dim=1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    same = maxc == minc
    span = maxc - minc
    s = span / torch.where(same, torch.ones_like(maxc), maxc)
    span = torch.where(same, torch.ones_like(span), span)
    rc, gc, bc = (maxc - r) / span, (maxc - g) / span, (maxc - b) / span
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.remainder(h / 6.0 + 1.0, 1.0)
    return h, s, maxc


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = torch.remainder(i, 6).long().unsqueeze(1)
    p, q, t = (v * (1 - s)).clamp(0, 1), (v * (1 - s * f)).clamp(0, 1), (v * (1 - s * (1 - f))).clamp(0, 1)
    r = torch.stack([v, q, p, p, t, v], dim=1).gather(1, i)
    g = torch.stack([t, v, v, q, p, p], dim=1).gather(1, i)
    b = torch.stack([p, p, t, v, v, q], dim=1).gather(1, i)
    return torch.cat([r, g, b], dim=1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Separable Gaussian blur, one sigma per sample (0: unchanged), reflect padding, as
    torchvision's gaussian_blur with kernel size ``kernel``: two depthwise convolutions, each
    sample's channels a group with its own 1-D kernel."""
    n, c, height, width = x.shape
    half = kernel // 2
    offsets = torch.arange(kernel, device=x.device, dtype=x.dtype) - half
    safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    w = torch.exp(-0.5 * (offsets[None, :] / safe[:, None]) ** 2)
    w = w / w.sum(dim=1, keepdim=True)
    delta = (offsets == 0).to(x.dtype).expand_as(w)
    w = torch.where((sigma > 0)[:, None], w, delta).repeat_interleave(c, dim=0)  # [N * C, kernel]
    padded = F.pad(x, (half, half, half, half), mode="reflect").reshape(1, n * c, height + 2 * half, -1)
    rows = F.conv2d(padded, w.view(n * c, 1, kernel, 1), groups=n * c)
    return F.conv2d(rows, w.view(n * c, 1, 1, kernel), groups=n * c).view(n, c, height, width)
