"""Host CPU per image of MoCo v2's two views: the official pipeline, moco_xla's, and the decode limit.

    nice -n 19 python -m moco_xla.bench --pipelines --out benchmarks/results   # pipelines.json

Side by side in one process, one thread, interleaved rounds (the median counts), CPU time
of this process (``time.process_time``: other load on a shared host stretches wall time,
not it). Rows, on each input set:
- official: facebookresearch/moco main_moco.py's aug+ as it builds it (PIL: ImageFolder's
  loader, RandomResizedCrop 224 scale 0.2-1, ColorJitter 0.4/0.4/0.4/0.1 p 0.8,
  RandomGrayscale 0.2, its GaussianBlur (PIL, sigma 0.1-2) p 0.5, flip, ToTensor,
  Normalize, two crops);
- moco_xla before: decode_bytes, then the torchvision.transforms.v2 preset on tensors, twice;
- moco_xla: transforms.CropViews (the host half: uint8 views, channels last; the device does the
  flip, the colour and the transposition), and the same with the whole JPEG decoded (where its
  compiled region decoder is not built);
- decode: the JPEG decoded alone (the least any pipeline must do), with PIL, with
  torchvision.io, with simplejpeg, and as CropViews decodes (only the rectangle its two crops
  cover, at the DCT scale they allow); the cheapest of them is the limit the goal's ratio
  divides by;
- moco_xla's stages, each timed alone on the same JPEGs: the header and the crop draws, the
  decode of the crops' rectangle, the two resized crops (where the time above the decode goes);
- on larger photos (about 1200x850, where most pairs of crops keep twice the view's pixels):
  the official pipeline, CropViews, CropViews with the whole JPEG decoded, CropViews' steps with
  every JPEG decoded whole at full scale, and the decodes (what the region and the reduced DCT
  scale save).
Inputs are made offline from scikit-learn's two photographs: ImageNet-size JPEGs (random
crops about 500x375, rescaled, quality 85-95), the larger photos (the same crops rescaled
2-2.5x) and CIFAR-size images (32x32 uint8, the ``small_v2`` preset). The shard rows run the
real pre-training loader (0 workers) over WebDataset shards of the same JPEGs, local and
streamed from the GCS emulator.
"""
from __future__ import annotations

import io
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

SIZE = 224
WHOLE_IMAGE_ROW = "moco_xla, the whole JPEG decoded (where _jpeg_region is not built)"
AS_CROPVIEWS_ROW = "decode only (as CropViews: the crops' rectangle, at the DCT scale they allow)"
# vCPUs per chip of TPU hosts (the v5e count from Google's v5e page, VM types; v6e and v4 as issue 28 gives them)
TPU_HOSTS = {"v5e-8 (ct5lp-hightpu-8t: 224 vCPUs, 8 chips)": 28, "v6e-8 (180 vCPUs, 8 chips)": 22.5,
             "v4-8 (240 vCPUs, 4 chips)": 60}


def photo_jpegs(n: int, seed: int = 0, rescale: tuple[float, float] = (0.8, 1.25)) -> list[bytes]:
    """ImageNet-like JPEGs: random crops (about 500x375) of the two sample photographs,
    rescaled by 0.8-1.25 (``rescale``; 2-2.5: photos of about 1200x850), re-encoded at quality 85-95."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    photos = [Image.fromarray(a) for a in load_sample_images().images]  # 427x640 each
    rng = random.Random(seed)
    out = []
    for i in range(n):
        photo = photos[i % 2]
        w, h = rng.randint(420, 640), rng.randint(320, 427)
        left, top = rng.randint(0, 640 - w), rng.randint(0, 427 - h)
        s = rng.uniform(*rescale)
        img = photo.crop((left, top, left + w, top + h)).resize((round(w * s), round(h * s)), Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=rng.randint(85, 95))
        out.append(buf.getvalue())
    return out


def cifar_images(n: int, seed: int = 0) -> list[torch.Tensor]:
    """32x32 uint8 images: random crops of the photographs, downscaled as CIFAR's were."""
    from PIL import Image
    jpegs = photo_jpegs(n, seed)
    out = []
    for data in jpegs:
        img = Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.BILINEAR)
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous())
    return out


class OfficialGaussianBlur:
    """moco/loader.py's GaussianBlur: PIL's filter with a uniform random sigma."""

    def __init__(self, sigma=(0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, x):
        from PIL import ImageFilter
        return x.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.sigma[0], self.sigma[1])))


def official_pipeline() -> Callable[[bytes], list]:
    """main_moco.py's aug+ with TwoCropsTransform, on ImageFolder's PIL loader."""
    from PIL import Image
    from torchvision import transforms
    normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    aug = transforms.Compose([
        transforms.RandomResizedCrop(SIZE, scale=(0.2, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([OfficialGaussianBlur([0.1, 2.0])], p=0.5),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ])

    def run(data: bytes) -> list:
        img = Image.open(io.BytesIO(data)).convert("RGB")  # torchvision's pil_loader
        return [aug(img), aug(img)]
    return run


def moco_xla_before(size: int = SIZE, preset: str = "moco_v2") -> Callable:
    from ..data.images import decode_bytes
    from ..data.transforms import TwoCrops, pretrain_transform
    views = TwoCrops(pretrain_transform(preset, size, 3))
    return lambda data: views(decode_bytes(data, 3) if isinstance(data, bytes) else data)


def moco_xla_now(size: int = SIZE) -> Callable:
    from ..data.transforms import CropViews
    return CropViews(size, 3)


def decode_pil() -> Callable[[bytes], Any]:
    """Decode only, with PIL (what ImageFolder's loader does)."""
    from PIL import Image

    def run(data: bytes):
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    return run


def decode_torchvision() -> Callable[[bytes], Any]:
    """Decode only, with torchvision.io (libjpeg-turbo), as moco_xla decoded JPEGs before simplejpeg."""
    from torchvision.io import ImageReadMode, decode_image
    return lambda data: decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def decode_simplejpeg() -> Callable[[bytes], Any]:
    """Decode only, with simplejpeg (libjpeg-turbo, channels last), as CropViews decodes a whole JPEG."""
    import simplejpeg
    return lambda data: simplejpeg.decode_jpeg(data, "RGB")


def decode_reduced(size: int = SIZE) -> Callable[[bytes], Any]:
    """Decode only, as CropViews decodes: the size from the JPEG header, the crop draws, then
    the rectangle that covers both crops alone (images.decode_jpeg_region), at the DCT scale the
    two crops allow (full scale where they keep less than twice the view's pixels)."""
    from ..data.images import decode_jpeg_region, jpeg_header
    from ..data.transforms import covering_rect, plan_crops

    def run(data: bytes):
        header = jpeg_header(data)
        plan = plan_crops(header, size)
        return decode_jpeg_region(data, 3, header, plan.shrink, covering_rect(plan.scaled, plan.size))
    return run


def moco_xla_whole_image(size: int = SIZE) -> Callable[[bytes], Any]:
    """CropViews' steps with the whole JPEG decoded (simplejpeg, at the DCT scale the crops allow),
    as where its region decoder (moco_xla.data._jpeg_region) is not built: what decoding only the
    crops' rectangle saves."""
    from ..data.images import decode_jpeg_pixels, jpeg_header
    from ..data.transforms import plan_crops, resized_crop

    def run(data: bytes):
        header = jpeg_header(data)
        plan = plan_crops(header, size)
        pixels = decode_jpeg_pixels(data, 3, header, plan.shrink)
        return [resized_crop(pixels, box, size) for box in plan.scaled]
    return run


def moco_xla_full_scale(size: int = SIZE) -> Callable[[bytes], Any]:
    """CropViews' steps with every JPEG decoded whole at full scale: what the region and the reduced
    DCT scale save together."""
    from ..data.images import decode_jpeg_pixels, jpeg_header
    from ..data.transforms import crop_params, resized_crop

    def run(data: bytes):
        header = jpeg_header(data)
        pixels = decode_jpeg_pixels(data, 3, header)
        return [resized_crop(pixels, crop_params(header.height, header.width), size) for _ in range(2)]
    return run


def cpu_ms_per_image(fn: Callable, items: list) -> float:
    t0 = time.process_time()
    for item in items:
        fn(item)
    return 1000 * (time.process_time() - t0) / len(items)


def interleaved(rows: dict[str, tuple[Callable, list]], rounds: int) -> dict[str, float]:
    """Median CPU ms per image of each row over ``rounds`` rounds (the order rotates)."""
    names, times = list(rows), {name: [] for name in rows}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, items = rows[name]
            times[name].append(cpu_ms_per_image(fn, items))
    return {name: float(np.median(v)) for name, v in times.items()}


def moco_xla_stages(jpegs: list[bytes], rounds: int, size: int = SIZE) -> dict[str, float]:
    """CPU ms per image of each stage of CropViews' path at full DCT scale, each timed alone over the
    same JPEGs (interleaved rounds, median), on inputs the stage before made: where its time goes."""
    from ..data.images import decode_jpeg_pixels, decode_jpeg_region, jpeg_header
    from ..data.transforms import covering_rect, crop_params, resized_crop

    def draws(data: bytes):
        header = jpeg_header(data)
        return [crop_params(header.height, header.width) for _ in range(2)]

    headers = [jpeg_header(data) for data in jpegs]
    pixels = [decode_jpeg_pixels(data, 3, header) for data, header in zip(jpegs, headers)]
    drawn = [draws(data) for data in jpegs]
    rects = [covering_rect(boxes, (h.height, h.width)) for boxes, h in zip(drawn, headers)]
    return interleaved({
        "JPEG header and the crop draws": (draws, jpegs),
        "decode of the crops' rectangle (libjpeg-turbo, channels last)":
            (lambda jhr: decode_jpeg_region(jhr[0], 3, jhr[1], 1, jhr[2]), list(zip(jpegs, headers, rects))),
        "two antialiased resized crops (uint8, channels last)":
            (lambda pd: [resized_crop(pd[0], box, size) for box in pd[1]], list(zip(pixels, drawn))),
    }, rounds)


def shard_rows(jpegs: list[bytes], rounds: int) -> dict[str, float]:
    """CPU ms per image of the pre-training loader (0 workers, batch 32, 224 px, moco_v2) over
    WebDataset shards, local and on the GCS emulator: the old and the new host transform, and
    the samples read from the shards alone (no decode, no batching)."""
    from .. import data, shards
    from ..config import load_config
    from ..data.badsamples import SkipCounter
    from ..data.emulator import gcs_emulator
    from ..data.shardset import iter_shard
    from ..data.transforms import TwoCrops, pretrain_transform
    out: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, gcs_emulator(["pipelines"]):
        folder = Path(tmp) / "folder"
        for i, b in enumerate(jpegs):
            d = folder / f"class_{i % 4}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:05d}.jpg").write_bytes(b)
        common = ["--dataset", "folder", "--root", str(folder), "--shard-size", "64", "--quiet",
                  "--test-fraction", "0.1"]
        roots = {"local shards": str(Path(tmp) / "shards"), "GCS emulator shards": "gs://pipelines/shards"}
        for root in roots.values():
            for split in ("train", "test"):
                assert shards.main([*common, "--split", split, "--out", root]) == 0
        for _ in range(rounds):
            for where, root in roots.items():
                cfg = load_config("tiny", ["data.dataset=folder", f"data.root={root}", "data.augment=moco_v2",
                                           f"data.image_size={SIZE}", "model.in_channels=3", "data.shuffle_buffer=64"])
                ds = data.build(cfg).pretrain
                skips = SkipCounter()
                t0, n = time.process_time(), 0
                for i, count in enumerate(ds.manifest.counts):
                    n += sum(1 for _ in iter_shard(ds.manifest, i, 0, count, skips))
                out.setdefault(f"reading the samples alone, {where}", []).append(1000 * (time.process_time() - t0) / n)
                for label, transform in (("moco_xla before", TwoCrops(pretrain_transform("moco_v2", SIZE, 3))),
                                         ("moco_xla", ds.transform)):
                    ds.transform = transform
                    loader = data.pretrain_loader(ds, 32, 0, 1, seed=0, workers=0)
                    loader.set_epoch(0)
                    t0, n = time.process_time(), 0
                    for q, _k in loader:
                        n += q.shape[0]
                    out.setdefault(f"{label}, {where}", []).append(1000 * (time.process_time() - t0) / n)
    return {k: float(np.median(v)) for k, v in out.items()}


def run(quick: bool = False) -> dict[str, Any]:
    """Every row, one thread; {'imagenet': {row: ms}, 'cifar': {...}, 'shards': {...}, summary}."""
    torch.set_num_threads(1)
    n, rounds = (8, 1) if quick else (128, 5)
    torch.manual_seed(0)
    random.seed(0)
    jpegs, cifar = photo_jpegs(n), cifar_images(n)
    imagenet = interleaved({
        "official (PIL, main_moco.py aug+)": (official_pipeline(), jpegs),
        "moco_xla before (decode_bytes + v2 preset)": (moco_xla_before(), jpegs),
        "moco_xla (CropViews, uint8 to the device)": (moco_xla_now(), jpegs),
        WHOLE_IMAGE_ROW: (moco_xla_whole_image(), jpegs),
        "decode only (PIL, full scale)": (decode_pil(), jpegs),
        "decode only (torchvision.io, full scale)": (decode_torchvision(), jpegs),
        "decode only (simplejpeg, full scale)": (decode_simplejpeg(), jpegs),
        AS_CROPVIEWS_ROW: (decode_reduced(), jpegs),
    }, rounds)
    small = interleaved({
        "moco_xla before (small_v2 preset)": (moco_xla_before(32, "small_v2"), cifar),
        "moco_xla (CropViews, uint8 to the device)": (moco_xla_now(32), cifar),
    }, rounds)
    large_jpegs = photo_jpegs(n // 2, seed=2, rescale=(2.0, 2.5))
    large = interleaved({
        "official (PIL, main_moco.py aug+)": (official_pipeline(), large_jpegs),
        "moco_xla (CropViews, uint8 to the device)": (moco_xla_now(), large_jpegs),
        WHOLE_IMAGE_ROW: (moco_xla_whole_image(), large_jpegs),
        "moco_xla, every JPEG decoded whole at full scale": (moco_xla_full_scale(), large_jpegs),
        "decode only (simplejpeg, full scale)": (decode_simplejpeg(), large_jpegs),
        AS_CROPVIEWS_ROW: (decode_reduced(), large_jpegs),
    }, rounds)
    stages = moco_xla_stages(jpegs, rounds)
    shard = shard_rows(photo_jpegs(40 if quick else 288, seed=1), rounds)
    official, ours = imagenet["official (PIL, main_moco.py aug+)"], imagenet["moco_xla (CropViews, uint8 to the device)"]
    return {"images": {"imagenet": len(jpegs), "large": len(large_jpegs), "cifar": len(cifar)}, "rounds": rounds,
            "threads": 1, "view_size": SIZE, "imagenet_cpu_ms": imagenet, "large_cpu_ms": large,
            "cifar_cpu_ms": small, "shards_cpu_ms": shard,
            "moco_xla_stages_cpu_ms": stages,
            "official_over_moco_xla": official / ours,
            "moco_xla_over_decode": ours / min(ms for name, ms in imagenet.items() if name.startswith("decode only")),
            "bytes_to_device_per_image": {"moco_xla": 2 * 3 * SIZE * SIZE, "official": 2 * 3 * SIZE * SIZE * 4}}


def table(r: dict[str, Any]) -> str:
    lines = [f"host CPU ms per image (two {r['view_size']}-px views), 1 thread, median of {r['rounds']} rounds"]
    for part, title in (("imagenet_cpu_ms", f"ImageNet-size JPEGs ({r['images']['imagenet']})"),
                        ("large_cpu_ms", f"large photos, about 1200x850 ({r['images']['large']})"),
                        ("cifar_cpu_ms", f"CIFAR-size 32x32 ({r['images']['cifar']}), 32-px views"),
                        ("moco_xla_stages_cpu_ms", "moco_xla's stages, each timed alone (ImageNet-size)"),
                        ("shards_cpu_ms", "pre-training loader over WebDataset shards, 0 workers")):
        lines.append(title)
        lines += [f"  {name:<68} {ms:7.2f}" for name, ms in r[part].items()]
    lines.append(f"official / moco_xla: {r['official_over_moco_xla']:.2f}x (goal >= 2.0); "
                 f"moco_xla / the cheapest decode only: {r['moco_xla_over_decode']:.2f}x (goal <= 1.5)")
    return "\n".join(lines)


def markdown(r: dict[str, Any]) -> str:
    """The tables docs/benchmarks.md section 7 embeds (<out>/pipelines.md), from one run's JSON."""
    rows, official = r["imagenet_cpu_ms"], r["imagenet_cpu_ms"]["official (PIL, main_moco.py aug+)"]
    cheapest = min(ms for name, ms in rows.items() if name.startswith("decode only"))
    lines = [f"| ImageNet-size JPEGs, two {r['view_size']}-px views | CPU ms / image | official / row | "
             "row / the cheapest decode |", "|---|---|---|---|"]
    for name, ms in rows.items():
        ratio = "" if name.startswith("decode only") else f"{official / ms:.2f}x"
        lines.append(f"| {name} | {ms:.2f} | {ratio} | {ms / cheapest:.2f}x |")
    stages = r["moco_xla_stages_cpu_ms"]
    total, decode = sum(stages.values()), next(ms for name, ms in stages.items() if name.startswith("decode"))
    lines += ["", f"| moco_xla's stages, each timed alone (sum {total:.2f}) | CPU ms / image | share | / decode |",
              "|---|---|---|---|"]
    lines += [f"| {name} | {ms:.2f} | {ms / total:.0%} | {ms / decode:.2f} |" for name, ms in stages.items()]
    large, full = r["large_cpu_ms"], r["large_cpu_ms"]["decode only (simplejpeg, full scale)"]
    lines += ["", f"| large photos (about 1200x850 JPEGs), two {r['view_size']}-px views | CPU ms / image | "
              "row / the full decode |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.2f} | {ms / full:.2f}x |" for name, ms in large.items()]
    for part, title in (("cifar_cpu_ms", "CIFAR-size 32x32, two 32-px views"),
                        ("shards_cpu_ms", "pre-training loader, 0 workers, batch 32, WebDataset shards of photo JPEGs")):
        lines += ["", f"| {title} | CPU ms / image |", "|---|---|"]
        lines += [f"| {name} | {ms:.2f} |" for name, ms in r[part].items()]
    feeds = {name: ms for name, ms in rows.items() if not name.startswith("decode only")}
    lines += ["", "| images/s per chip, every vCPU of the host on the pipeline | vCPUs per chip | "
              + " | ".join(f"{name} ({ms:.2f} ms)" for name, ms in feeds.items()) + " |",
              "|---|---|" + "---|" * len(feeds)]
    lines += [f"| {host} | {vcpus:g} | " + " | ".join(f"{1000 * vcpus / ms:,.0f}" for ms in feeds.values()) + " |"
              for host, vcpus in TPU_HOSTS.items()]
    return "\n".join(lines)
