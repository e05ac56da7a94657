"""The faster host paths CropViews does not take, measured: what each would save and what it changes.

    nice -n 19 python -m moco_xla.bench --pipeline-limits --out benchmarks/results   # pipeline-limits.json

Issue 28 asks for two MoCo v2 views within 1.5x of decoding the JPEG alone. CropViews spends
the time above the decode on its two antialiased resizes (docs/benchmarks.md section
7). This bench times, side by side on the same ImageNet-size JPEGs (one process, one thread,
interleaved rounds, the median; CPU time), the candidates for doing less:
- decoders: torchvision.io and PIL, as the --pipelines decode rows call them, and simplejpeg
  (CropViews' decoder; libjpeg-turbo, full size and its scaled decodes at 7/8, 6/8, 5/8 and 4/8;
  and full size to 4-channel RGBX pixels, the layout torch's resize kernel works in);
- one view from a crop box of the decoded pixels: the exact view (torch's antialiased bilinear
  uint8 kernel on the crop in one call, columns first: torchvision's RandomResizedCrop, the
  recipe's), CropViews' path (the same kernel, rows first where both sides shrink: the
  rounding of the intermediate image differs), and OpenCV's resize
  straight from the crop with area averaging (antialiased, another filter) and with
  plain bilinear sampling (no antialiasing), and the exact kernel on 4-channel RGBX pixels (no
  unpacking and packing of 3-channel rows inside it) followed by the copy that drops the 4th
  channel (the views ship 3 channels), each with its mean absolute difference from the exact view
  in 0-255 levels (the larger the difference, the more the view means something else).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .pipelines import SIZE, decode_pil, decode_torchvision, interleaved, photo_jpegs

SCALES = (8, 7, 6, 5, 4)  # simplejpeg decodes at scale/8 of full size


def decode_rows(jpegs: list[bytes], rounds: int) -> dict[str, float]:
    """CPU ms per image of decoding alone, by decoder and by libjpeg-turbo's DCT scale."""
    import simplejpeg

    def scaled(m: int):
        def decode(data: bytes):
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            return simplejpeg.decode_jpeg(data, "RGB", min_height=height * m // 8, min_width=width * m // 8)
        return decode

    rows = {"torchvision.io, full size": (decode_torchvision(), jpegs), "PIL, full size": (decode_pil(), jpegs)}
    rows.update({f"simplejpeg, {m}/8 size": (scaled(m), jpegs) for m in SCALES})
    rows["simplejpeg, 8/8 size, RGBX (4 channels)"] = (lambda data: simplejpeg.decode_jpeg(data, "RGBX"), jpegs)
    return interleaved(rows, rounds)


def view_rows(jpegs: list[bytes], rounds: int, size: int = SIZE) -> dict[str, Any]:
    """CPU ms per view and mean |difference| from the exact view, for one crop box per image."""
    import cv2
    import simplejpeg
    import torch.nn.functional as F

    from ..data.images import decode_bytes
    from ..data.transforms import channels_last_pixels, crop_params, resized_crop
    cv2.setNumThreads(1)
    torch.manual_seed(0)
    pixels = [channels_last_pixels(decode_bytes(data, 3)) for data in jpegs]
    boxes = [crop_params(p.shape[1], p.shape[2]) for p in pixels]
    items = list(zip(pixels, boxes))
    rgbx = [(torch.from_numpy(simplejpeg.decode_jpeg(data, "RGBX"))[None], box) for data, box in zip(jpegs, boxes)]

    def exact(item):
        top, left, h, w = item[1]
        crop = item[0][:, top:top + h, left:left + w].permute(0, 3, 1, 2)
        return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)[0].permute(1, 2, 0)

    def crop_views(item):
        return resized_crop(item[0], item[1], size)

    def opencv(interpolation: int):
        def view(item):
            top, left, h, w = item[1]
            return cv2.resize(item[0][0, top:top + h, left:left + w].numpy(), (size, size), interpolation=interpolation)
        return view

    def four_channels(item):
        return resized_crop(item[0], item[1], size)[..., :3].contiguous().numpy()

    candidates = {"CropViews (resized_crop: rows first where both sides shrink)": (crop_views, items),
                  "OpenCV INTER_AREA from the crop": (opencv(cv2.INTER_AREA), items),
                  "OpenCV INTER_LINEAR from the crop (not antialiased)": (opencv(cv2.INTER_LINEAR), items),
                  "the same kernel on RGBX pixels (simplejpeg), then the 4th channel dropped": (four_channels, rgbx)}
    ms = interleaved({"exact (torch antialiased bilinear from the crop, one call: torchvision's)": (exact, items),
                      **candidates}, rounds)
    reference = [exact(item).numpy().astype(np.float32) for item in items]
    diff = {name: float(np.mean([np.abs(np.asarray(fn(item), dtype=np.float32) - ref).mean()
                                 for item, ref in zip(its, reference)])) for name, (fn, its) in candidates.items()}
    return {"cpu_ms_per_view": ms, "mean_abs_diff_levels": diff}


def run(quick: bool = False) -> dict[str, Any]:
    torch.set_num_threads(1)
    n, rounds = (8, 1) if quick else (128, 5)
    jpegs = photo_jpegs(n)
    return {"images": n, "rounds": rounds, "decode_cpu_ms": decode_rows(jpegs, rounds),
            **view_rows(jpegs, rounds)}


def table(r: dict[str, Any]) -> str:
    """Markdown of the two tables: decoders and DCT scales; ways of making one view."""
    dec = r["decode_cpu_ms"]
    base = dec["torchvision.io, full size"]
    lines = ["| decode alone (ImageNet-size JPEGs) | CPU ms / image | / torchvision.io |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.2f} | {ms / base:.2f}x |" for name, ms in dec.items()]
    views, diffs = r["cpu_ms_per_view"], r["mean_abs_diff_levels"]
    exact = next(ms for name, ms in views.items() if name.startswith("exact"))
    lines += ["", "| one 224-px view from a crop of the decoded pixels | CPU ms / view | / exact | "
              "mean abs difference from exact (0-255) |", "|---|---|---|---|"]
    for name, ms in views.items():
        diff = f"{diffs[name]:.2f}" if name in diffs else "0"
        lines.append(f"| {name} | {ms:.3f} | {ms / exact:.2f}x | {diff} |")
    return "\n".join(lines)
