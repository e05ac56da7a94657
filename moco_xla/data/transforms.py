"""MoCo augmentations (torchvision.transforms.v2), two views per image.

Presets, chosen by ``data.augment``:
- moco_v1: RandomResizedCrop 224 scale (0.2, 1), RandomGrayscale 0.2, ColorJitter 0.4, flip
- moco_v2: "aug+": crop, colour jitter p 0.8, grayscale p 0.2, Gaussian blur p 0.5, flip
- small / small_v2: the same at small sizes (32x32 crops, as in the CIFAR-10 demo)
- digits: grayscale digits: random resized crop and Gaussian blur, no flip
  (a flipped digit is another digit)
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
GRAY_MEAN, GRAY_STD = (0.5,), (0.5,)

PRESETS = ("moco_v1", "moco_v2", "small", "small_v2", "digits")


def normalize_for(channels: int, preset: str) -> v2.Normalize:
    if channels == 1:
        return v2.Normalize(GRAY_MEAN, GRAY_STD)
    if preset.startswith("small"):
        return v2.Normalize(CIFAR_MEAN, CIFAR_STD)
    return v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)


def _to_float() -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]


def pretrain_transform(preset: str, size: int, channels: int) -> v2.Compose:
    """The random augmentation applied independently to each of the two views."""
    norm = normalize_for(channels, preset)
    blur_k = max(3, (size // 10) | 1)  # odd kernel about 10% of the image, as in MoCo v2
    gray = [v2.Grayscale(num_output_channels=channels)] if channels == 1 else []
    if preset == "digits":
        ops = [v2.RandomResizedCrop(size, scale=(0.4, 1.0), ratio=(0.8, 1.25), antialias=True),
               v2.RandomApply([v2.GaussianBlur(blur_k, sigma=(0.1, 1.0))], p=0.5)]
        return v2.Compose(_to_float() + gray + ops + [norm])
    scale = (0.2, 1.0)
    color = [] if channels == 1 else None
    if preset in ("moco_v1", "small"):
        color = color if color is not None else [v2.RandomGrayscale(p=0.2), v2.ColorJitter(0.4, 0.4, 0.4, 0.4)]
        ops = [v2.RandomResizedCrop(size, scale=scale, antialias=True), *color, v2.RandomHorizontalFlip()]
    else:  # moco_v2 / small_v2: aug+
        color = color if color is not None else [
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2)]
        ops = [v2.RandomResizedCrop(size, scale=scale, antialias=True), *color,
               v2.RandomApply([v2.GaussianBlur(blur_k, sigma=(0.1, 2.0))], p=0.5),
               v2.RandomHorizontalFlip()]
    if preset not in PRESETS:
        raise ValueError(f"unknown augment {preset!r}; valid: {', '.join(PRESETS)}")
    return v2.Compose(_to_float() + gray + ops + [norm])


def eval_transform(preset: str, size: int, channels: int) -> v2.Compose:
    """Deterministic transform for feature banks, kNN and linear probes."""
    gray = [v2.Grayscale(num_output_channels=channels)] if channels == 1 else []
    if preset in ("moco_v1", "moco_v2") and size >= 64:
        resize = [v2.Resize(int(size * 256 / 224), antialias=True), v2.CenterCrop(size)]
    else:
        resize = [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    return v2.Compose(_to_float() + gray + resize + [normalize_for(channels, preset)])


class TwoCrops:
    """Two independent augmentations of one image: the query and the key."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, img):
        return self.transform(img), self.transform(img)
