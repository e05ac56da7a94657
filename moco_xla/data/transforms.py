"""MoCo augmentations (torchvision.transforms.v2), two views per image.

Pre-training splits the MoCo presets (DEVICE_PRESETS) between host and accelerator:
``CropViews`` decodes each image once (only the rectangle its two crops cover) and makes both
views' random resized crop as uint8, channels last (a quarter of float32's bytes to the device),
and data.device_augment does the flip, the turn to channels-first, the colour jitter, grayscale,
blur and normalisation on the batch inside the step.
``pretrain_transform`` is the same augmentation made whole on the host (float, normalised):
the digits presets use it for pre-training, evaluation uses it where it wants augmented views.

Presets, chosen by ``data.augment``:
- moco_v1: RandomResizedCrop 224 scale (0.2, 1), RandomGrayscale 0.2, ColorJitter 0.4, flip
- moco_v2: "aug+": crop, colour jitter p 0.8, grayscale p 0.2, Gaussian blur p 0.5, flip
- small / small_v2: the same at small sizes (32x32 crops, as in the CIFAR-10 demo)
- digits: grayscale digits: random resized crop and Gaussian blur, no flip
  (a flipped digit is another digit)
- digits_fine: digits with the crop drawn on the view's grid (the image resized to the view's size
  first): on 8x8 digits shown at 16 px, crops of 80-100% then move and scale by half a stored pixel,
  where on the stored grid they take about ten distinct boxes
- digits_affine: digits plus a small random affine warp (rotation 10 deg, shear 10 deg,
  translation 10%, scale 0.9-1.1): the pen-stroke variations of handwriting
- handwriting / handwriting_crop: affine warp, elastic distortion, stroke width and random erasing
  (data/handwriting.py), the second after the digits preset's crop and blur
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

from .device_augment import DeviceRecipe
from .images import JpegHeader, dct_scaled_size, decode_bytes, decode_jpeg_pixels, decode_jpeg_region, jpeg_header
from .handwriting import PRESETS as HANDWRITING_PRESETS, handwriting_ops

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
GRAY_MEAN, GRAY_STD = (0.5,), (0.5,)

PRESETS = ("moco_v1", "moco_v2", "small", "small_v2", "digits", "digits_fine", "digits_affine", *HANDWRITING_PRESETS)


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


def crop_scale(preset: str, crop_min_scale: float | None = None) -> tuple[float, float]:
    """The random resized crop's range of area fractions: (crop_min_scale or the preset's own, 1)."""
    own = 0.4 if preset.startswith(("digits", "handwriting")) else CROP_SCALE[0]
    return (own if crop_min_scale is None else crop_min_scale, 1.0)


def pretrain_transform(preset: str, size: int, channels: int, crop_min_scale: float | None = None) -> v2.Compose:
    """The random augmentation applied independently to each of the two views."""
    if preset not in PRESETS:
        raise ValueError(f"unknown augment {preset!r}; valid: {', '.join(PRESETS)}")
    norm = normalize_for(channels, preset)
    blur_k = max(3, (size // 10) | 1)  # odd kernel about 10% of the image, as in MoCo v2
    scale = crop_scale(preset, crop_min_scale)
    if preset in ("digits", "digits_fine", "digits_affine"):
        grid = [v2.Resize((size, size), antialias=True)] if preset == "digits_fine" else []
        warp = ([v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=10)]
                if preset == "digits_affine" else [])
        ops = [*grid, v2.RandomResizedCrop(size, scale=scale, ratio=(0.8, 1.25), antialias=True), *warp,
               v2.RandomApply([v2.GaussianBlur(blur_k, sigma=(0.1, 1.0))], p=0.5)]
        return v2.Compose(_prepare(channels) + ops + _finish(norm))
    if preset in HANDWRITING_PRESETS:  # uint8 warps, then the pen on the float image, then normalise
        geometric, pen = handwriting_ops(preset, size, blur_k, scale)
        return v2.Compose(_prepare(channels) + geometric + [v2.ToDtype(torch.float32, scale=True), *pen, norm])
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


DEVICE_PRESETS = ("moco_v1", "moco_v2", "small", "small_v2")  # the device finishes these presets' views
CROP_SCALE, CROP_RATIO = (0.2, 1.0), (3 / 4, 4 / 3)
REGION_PAD = 2  # pixels around the crops' rectangle: the chroma upsampling's reach past its edge is one


def device_recipe(preset: str, size: int, channels: int) -> DeviceRecipe | None:
    """The flip and colour ops ``preset`` leaves to the device (data.device_augment), or None where
    the host makes the whole view (digits presets): the same recipe as ``pretrain_transform``."""
    if preset not in DEVICE_PRESETS:
        return None
    norm = normalize_for(channels, preset)
    base = {"mean": tuple(norm.mean), "std": tuple(norm.std), "flip_p": 0.5}
    if preset in ("moco_v1", "small"):
        return DeviceRecipe(**base, jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, gray_p=0.2, gray_first=True)
    return DeviceRecipe(**base, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.5,
                        blur_sigma=(0.1, 2.0), blur_kernel=max(3, (size // 10) | 1))


def crop_params(height: int, width: int, scale: tuple[float, float] = CROP_SCALE) -> tuple[int, int, int, int]:
    """(top, left, height, width) of one RandomResizedCrop(scale, ratio 3/4-4/3) draw.

    torchvision's algorithm (up to 10 tries of a uniform area and a log-uniform aspect ratio
    that fit, else the whole image clipped to the ratio range, centred), its uniforms taken
    from torch's RNG in one call: the same distribution at a tenth of the host time.
    """
    area = height * width
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for u_area, u_ratio, u_top, u_left in torch.rand(10, 4).tolist():
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        ratio = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        h, w = height, int(round(height * CROP_RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def channels_last_pixels(img: torch.Tensor) -> torch.Tensor:
    """uint8 [C, H, W] -> [1, H, W, C] contiguous: no copy of what the decoders return (their
    pixels are height, width, channels in memory), a copy of a channels-first tensor."""
    return img.permute(1, 2, 0).contiguous()[None]


def resized_crop(pixels: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """The crop ``box`` (top, left, height, width) of [1, H, W, C] uint8 pixels resized to
    [size, size, C] uint8: torch's antialiased bilinear uint8 kernel (what RandomResizedCrop
    calls), channels last in and out (its fastest layout, no transposition). The kernel reads
    the crop where it lies in ``pixels``: no copy of it beforehand.

    Where both sides shrink, the rows are resized first, then the columns: the kernel's own order
    (columns first, over every row of the crop) runs its costlier pass, along the rows, on more
    of them. The same separable filter in the other order: pixels within one grey level of
    torchvision's resized_crop (the rounding of the intermediate image), about 0.9 of the CPU
    (docs/benchmarks.md section 7)."""
    top, left, h, w = box
    crop = pixels[:, top:top + h, left:left + w].permute(0, 3, 1, 2)
    if h > size and w > size:
        crop = F.interpolate(crop, size=(size, w), mode="bilinear", align_corners=False, antialias=True)
    view = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return view[0].permute(1, 2, 0)


def dct_shrink(smaller_over_size: float) -> int:
    """1, 2, 4 or 8: the most a JPEG can be shrunk in its DCT (libjpeg-turbo's scaled IDCT; the
    scales between 1/2 and 1 cost more than the full decode) while a crop whose shorter side is
    ``smaller_over_size`` times the view's still has at least the view's pixels."""
    return 8 if smaller_over_size >= 8 else 4 if smaller_over_size >= 4 else 2 if smaller_over_size >= 2 else 1


def reduced_box(box: tuple[int, int, int, int], full: tuple[int, int], reduced: tuple[int, int]
                ) -> tuple[int, int, int, int]:
    """A crop box (top, left, height, width) of the full image mapped onto its reduced decode
    ([height, width] ``full`` -> ``reduced``): each edge to the nearest reduced pixel, so the
    crop moves by at most half a reduced pixel (1-4 full pixels) at each edge."""
    top, left, h, w = box
    sy, sx = reduced[0] / full[0], reduced[1] / full[1]
    t, b = min(round(top * sy), reduced[0] - 1), min(round((top + h) * sy), reduced[0])
    lft, r = min(round(left * sx), reduced[1] - 1), min(round((left + w) * sx), reduced[1])
    return t, lft, max(b - t, 1), max(r - lft, 1)


class CropPlan(NamedTuple):
    """Two crop draws on a JPEG and the decode they allow (plan_crops)."""
    boxes: list  # (top, left, height, width) of each crop on the full image
    shrink: int  # the DCT scale of the decode: 1, 2, 4 or 8
    size: tuple[int, int]  # [height, width] of the decode at that scale
    scaled: list  # the boxes on that decode (the same boxes where shrink is 1)


def plan_crops(header: JpegHeader, view_size: int, scale: tuple[float, float] = CROP_SCALE) -> CropPlan:
    """Draw two crops on a JPEG of the header's size and choose its DCT scale (dct_shrink): the
    most it can shrink while both crops keep ``view_size`` pixels, each box then moved to the
    nearest pixel of the reduced decode (reduced_box)."""
    full = (header.height, header.width)
    boxes = [crop_params(*full, scale) for _ in range(2)]
    shrink = dct_shrink(min(min(h, w) for _t, _l, h, w in boxes) / view_size)
    size = dct_scaled_size(header, shrink)
    return CropPlan(boxes, shrink, size, boxes if shrink == 1 else [reduced_box(box, full, size) for box in boxes])


def covering_rect(boxes: list, size: tuple[int, int], pad: int = REGION_PAD) -> tuple[int, int, int, int]:
    """The smallest rectangle (top, left, height, width) that holds every box, grown by ``pad``
    pixels on each side within the image ([height, width] ``size``): what the region decode
    decodes, each crop's pixels then those of the whole-image decode (images.decode_jpeg_region)."""
    top = max(min(t for t, _l, _h, _w in boxes) - pad, 0)
    left = max(min(lft for _t, lft, _h, _w in boxes) - pad, 0)
    bottom = min(max(t + h for t, _l, h, _w in boxes) + pad, size[0])
    right = min(max(lft + w for _t, lft, _h, w in boxes) + pad, size[1])
    return top, left, bottom - top, right - left


class CropViews:
    """Two views of one image, each a random resized crop, uint8 [size, size, C].

    The host half of a DEVICE_PRESETS augmentation (the device flips, turns the views
    channels-first, and does colour, blur and normalisation: data.device_augment). Takes encoded
    bytes (``decodes``: datasets hand them over undecoded) or a decoded image. A JPEG's size is
    read from its header (images.jpeg_header) for the crop draws, then it is decoded once for both
    views, straight to channels-last pixels, and only as far as they need: the rectangle that
    covers both crops (covering_rect; images.decode_jpeg_region: libjpeg-turbo skips the rows and
    columns outside it), the whole image where that module is not built or cannot read it
    (simplejpeg; images.decode_jpeg_pixels). A JPEG whose two crops both keep at least twice
    ``size`` pixels on each side is decoded at a reduced DCT scale (1/2, 1/4 or 1/8, the smallest
    that leaves both crops at least ``size`` pixels: the views are downscaled from the crops
    anyway), each crop box mapped onto the reduced pixels to the nearest pixel (reduced_box).

    Each view is torch's antialiased bilinear uint8 kernel run on its crop of the channels-last
    pixels (what RandomResizedCrop does, here on its fastest layout), whose channels-last output
    is the view as it ships: height, width, channels, no transposition on the host.
    """

    decodes = True

    def __init__(self, size: int, channels: int, scale: tuple[float, float] = CROP_SCALE) -> None:
        self.size, self.channels, self.scale = size, channels, scale
        self._prepare = v2.Compose(_prepare(channels))

    def __call__(self, img) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(img, (bytes, bytearray, memoryview)):
            return self._from_bytes(bytes(img))
        img = self._prepare(img).as_subclass(torch.Tensor)
        return self._views(channels_last_pixels(img), [crop_params(*img.shape[-2:], self.scale) for _ in range(2)])

    def _from_bytes(self, data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        header = jpeg_header(data)
        if header is None:  # not a JPEG (or no readable header): decode first, then draw
            return self(decode_bytes(data, self.channels))
        plan = plan_crops(header, self.size, self.scale)
        region = decode_jpeg_region(data, self.channels, header, plan.shrink, covering_rect(plan.scaled, plan.size))
        if region is not None:  # the two crops' rectangle alone
            pixels, top, left = region
            return self._views(pixels, [(t - top, lft - left, h, w) for t, lft, h, w in plan.scaled])
        pixels = decode_jpeg_pixels(data, self.channels, header, plan.shrink)  # the whole image
        decoded = tuple(pixels.shape[1:3])
        if decoded == (header.height, header.width):  # full size (shrink 1, or a JPEG only the other decoders read)
            return self._views(pixels, plan.boxes)
        if decoded == plan.size:
            return self._views(pixels, plan.scaled)
        return self(pixels[0].permute(2, 0, 1))  # a header that lied: draw on the decoded pixels

    def _views(self, pixels: torch.Tensor, boxes: list) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [1, H, W, C] (channels last) -> both views, uint8 [size, size, C]."""
        return resized_crop(pixels, boxes[0], self.size), resized_crop(pixels, boxes[1], self.size)

    def __repr__(self) -> str:
        return f"CropViews(size={self.size}, channels={self.channels}, scale={self.scale})"


def views_transform(preset: str, size: int, channels: int, crop_min_scale: float | None = None):
    """Pre-training's per-image transform: CropViews (uint8, the device finishes them) for
    DEVICE_PRESETS, else TwoCrops of the whole host augmentation (float, normalised)."""
    if preset in DEVICE_PRESETS:
        return CropViews(size, channels, crop_scale(preset, crop_min_scale))
    return TwoCrops(pretrain_transform(preset, size, channels, crop_min_scale))


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


# ----------------------------------------------------------------------------- supervised (evaluation)

def train_transform(preset: str, size: int, channels: int) -> v2.Compose:
    """The supervised augmentation (lincls, fine-tuning, from-scratch): crops, flips where they keep the class."""
    gray = [v2.Grayscale(num_output_channels=channels)] if channels == 1 else []
    if preset.startswith(("digits", "handwriting")):  # no flips: a flipped digit is another digit;
        # the same crops for every digits preset: rows on checkpoints pre-trained with other
        # digit augmentations stay comparable
        ops = [v2.RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(0.8, 1.25), antialias=True)]
    elif preset.startswith("small"):  # CIFAR: pad-and-crop plus flip
        ops = [v2.Resize(size, antialias=True), v2.RandomCrop(size, padding=max(1, size // 8)),
               v2.RandomHorizontalFlip()]
    else:  # ImageNet lincls
        ops = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), *gray, *ops,
                       normalize_for(channels, preset)])
