"""MoCo augmentations (torchvision.transforms.v2), two views per image.

Presets, chosen by ``data.augment``:
- moco_v1: RandomResizedCrop 224 scale (0.2, 1), RandomGrayscale 0.2, ColorJitter 0.4, flip
- moco_v2: "aug+": crop, colour jitter p 0.8, grayscale p 0.2, Gaussian blur p 0.5, flip
- small / small_v2: the same at small sizes (32x32 crops, as in the CIFAR-10 demo)
- digits: grayscale digits: random resized crop and Gaussian blur, no flip
  (a flipped digit is another digit)
- digits_affine: digits plus a small random affine warp (rotation 10 deg, shear 10 deg,
  translation 10%, scale 0.9-1.1): the pen-stroke variations of handwriting
- handwriting / handwriting_crop: affine warp, elastic distortion, stroke width and random erasing
  (data/handwriting.py), the second after the digits preset's crop and blur
"""
from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from .handwriting import PRESETS as HANDWRITING_PRESETS, handwriting_ops

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
GRAY_MEAN, GRAY_STD = (0.5,), (0.5,)

PRESETS = ("moco_v1", "moco_v2", "small", "small_v2", "digits", "digits_affine", *HANDWRITING_PRESETS)


def normalize_for(channels: int, preset: str) -> v2.Normalize:
    if channels == 1:
        return v2.Normalize(GRAY_MEAN, GRAY_STD)
    if preset.startswith("small"):
        return v2.Normalize(CIFAR_MEAN, CIFAR_STD)
    return v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)


class ToChannels:
    """uint8 image tensor -> exactly ``channels`` channels: gray is replicated to RGB, RGB becomes gray.

    Lets any dataset feed any model (MNIST into a 3-channel ResNet, ImageNet into a gray one).
    """

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        c = img.shape[-3]
        if c == self.channels:
            return img
        if c in (2, 4):  # drop alpha
            return self(tv_tensors.Image(img[..., : c - 1, :, :]))
        if self.channels == 3 and c == 1:
            return tv_tensors.Image(img.expand(*img.shape[:-3], 3, *img.shape[-2:]).contiguous())
        if self.channels == 1 and c == 3:
            return tv_tensors.Image(v2.functional.rgb_to_grayscale(img))
        raise ValueError(f"cannot convert a {c}-channel image to {self.channels} channels")

    def __repr__(self) -> str:
        return f"ToChannels({self.channels})"


def _prepare(channels: int) -> list:
    """Image (PIL or uint8 tensor) -> uint8 tensor with the model's channels; crops run on uint8 (fast)."""
    return [v2.ToImage(), ToChannels(channels)]


def _finish(norm: v2.Normalize) -> list:
    return [v2.ToDtype(torch.float32, scale=True), norm]


def pretrain_transform(preset: str, size: int, channels: int) -> v2.Compose:
    """The random augmentation applied independently to each of the two views."""
    if preset not in PRESETS:
        raise ValueError(f"unknown augment {preset!r}; valid: {', '.join(PRESETS)}")
    norm = normalize_for(channels, preset)
    blur_k = max(3, (size // 10) | 1)  # odd kernel about 10% of the image, as in MoCo v2
    if preset in ("digits", "digits_affine"):
        ops = [v2.RandomResizedCrop(size, scale=(0.4, 1.0), ratio=(0.8, 1.25), antialias=True),
               v2.RandomApply([v2.GaussianBlur(blur_k, sigma=(0.1, 1.0))], p=0.5)]
        if preset == "digits_affine":
            ops.insert(1, v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=10))
        return v2.Compose(_prepare(channels) + ops + _finish(norm))
    if preset in HANDWRITING_PRESETS:  # uint8 warps, then the pen on the float image, then normalise
        geometric, pen = handwriting_ops(preset, size, blur_k)
        return v2.Compose(_prepare(channels) + geometric + [v2.ToDtype(torch.float32, scale=True), *pen, norm])
    scale = (0.2, 1.0)
    color: list = []  # colour jitter and random grayscale mean nothing on a gray image
    if preset in ("moco_v1", "small"):
        if channels == 3:
            color = [v2.RandomGrayscale(p=0.2), v2.ColorJitter(0.4, 0.4, 0.4, 0.4)]
        ops = [v2.RandomResizedCrop(size, scale=scale, antialias=True), *color, v2.RandomHorizontalFlip()]
    else:  # moco_v2 / small_v2: aug+
        if channels == 3:
            color = [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2)]
        ops = [v2.RandomResizedCrop(size, scale=scale, antialias=True), *color,
               v2.RandomApply([v2.GaussianBlur(blur_k, sigma=(0.1, 2.0))], p=0.5),
               v2.RandomHorizontalFlip()]
    return v2.Compose(_prepare(channels) + ops + _finish(norm))


def eval_transform(preset: str, size: int, channels: int) -> v2.Compose:
    """Deterministic transform for feature banks, kNN and linear probes."""
    if preset in ("moco_v1", "moco_v2") and size >= 64:
        resize = [v2.Resize(int(size * 256 / 224), antialias=True), v2.CenterCrop(size)]
    else:
        resize = [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    return v2.Compose(_prepare(channels) + resize + _finish(normalize_for(channels, preset)))


class TwoCrops:
    """Two independent augmentations of one image: the query and the key."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, img):
        return self.transform(img), self.transform(img)


class CleanAndAugmented:
    """One decoded image, two views: (``clean(img)``, ``augment(img)``). Noisy Student's distillation:
    the teacher labels the clean image, only the student is noised; one read and decode per sample."""

    def __init__(self, clean, augment) -> None:
        self.clean, self.augment = clean, augment

    def __call__(self, img):
        return self.clean(img), self.augment(img)
