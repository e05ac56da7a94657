"""The MoCo augmentation split between host (decode, crop, resize: uint8, channels last) and device
(flip, channels first, colour, blur, normalisation) means what the recipe means: its random draws
follow the recipe (fixed-seed statistical checks), a view made the new way equals torchvision's
ops on the same parameters, and the device half compiles once on XLA (static shapes, no host reads).
"""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from torchvision.transforms import v2

from moco_xla.data import device_augment as da
from moco_xla.data.transforms import CropViews, crop_params, device_recipe, views_transform

ROOT = Path(__file__).resolve().parent.parent
V2 = device_recipe("moco_v2", 224, 3)


def photo_jpeg(width: int = 500, height: int = 375, quality: int = 90) -> bytes:
    """A real photograph (scikit-learn's china.jpg), cropped and re-encoded."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    img = Image.fromarray(load_sample_images().images[0][:height, :width])
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def reference_crop(height: int, width: int, rng: np.random.Generator, low: float = 0.2) -> tuple[float, float]:
    """(area fraction, log aspect ratio) of RandomResizedCrop(scale low-1, ratio 3/4-4/3) as the
    paper's recipe defines it: 10 tries of a uniform area and log-uniform ratio that fit, else
    the whole image clipped to the ratio range."""
    for _ in range(10):
        area = rng.uniform(low, 1.0) * height * width
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return h * w / (height * width), math.log(w / h)
    return 1.0, math.log(width / height)


@pytest.mark.parametrize("low", [0.2, 0.6])
def test_crop_scales_and_ratios_follow_the_recipe(low):
    """The recipe's crops (scale 0.2-1), and a milder range as data.crop_min_scale=0.6 asks for."""
    torch.manual_seed(0)
    views = views_transform("moco_v2", 224, 3, None if low == 0.2 else low)
    got = np.array([(h * w / (375 * 500), math.log(w / h), t, l)
                    for t, l, h, w in (crop_params(375, 500, views.scale) for _ in range(3000))])
    rng = np.random.default_rng(0)
    ref = np.array([reference_crop(375, 500, rng, low) for _ in range(3000)])
    assert got[:, 0].min() >= low - 0.005 and got[:, 0].max() <= 1.0  # whole pixels: a side rounds by 0.5
    assert np.abs(got[:, 1]).max() <= math.log(4 / 3) + 0.01
    assert (got[:, 2] >= 0).all() and (got[:, 3] >= 0).all()
    assert stats.ks_2samp(got[:, 0], ref[:, 0]).pvalue > 0.01  # same area distribution
    assert stats.ks_2samp(got[:, 1], ref[:, 1]).pvalue > 0.01  # same ratio distribution


def ramp_is_mirrored(views: torch.Tensor) -> torch.Tensor:
    """Per view of a left-to-right ramp ([N, H, W, C]): whether it now decreases left to right."""
    return views[:, :, :4].float().mean(dim=(1, 2, 3)) > views[:, :, -4:].float().mean(dim=(1, 2, 3))


@pytest.mark.parametrize("encoded", [False, True])
def test_host_views_are_uint8_crops_and_the_device_flips_half_of_them(encoded):
    """A left-to-right ramp: the host's views all still increase (crops, never mirrored); the
    device mirrors exactly the views its draws say, about half of them."""
    from PIL import Image
    ramp = torch.linspace(0, 255, 200).round().to(torch.uint8).expand(3, 160, 200).contiguous()
    if encoded:
        buf = io.BytesIO()
        Image.fromarray(ramp.permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=95)
        image = buf.getvalue()
    else:
        image = ramp
    views = CropViews(32, 3)
    torch.manual_seed(1)
    host = torch.stack([view for _ in range(300) for view in views(image)])
    assert host.shape == (600, 32, 32, 3) and host.dtype == torch.uint8 and host[0].is_contiguous()
    assert not ramp_is_mirrored(host).any()
    recipe = device_recipe("small_v2", 32, 3)
    p = da.draw_params(recipe, len(host), "cpu", torch.Generator().manual_seed(2))
    p = {**p, "factors": torch.tensor([1.0, 1.0, 1.0, 0.0]).expand(len(host), 4),  # flip alone
         "gray": torch.zeros(len(host), dtype=torch.bool), "sigma": torch.zeros(len(host))}
    mirrored = ramp_is_mirrored(da.apply(recipe, host, p).permute(0, 2, 3, 1))
    assert torch.equal(mirrored, p["flip"]) and abs(mirrored.float().mean().item() - 0.5) < 0.05


def test_device_parameters_follow_the_recipe():
    n = 20000
    p = da.draw_params(V2, n, "cpu", torch.Generator().manual_seed(0))
    f = p["factors"]
    jittered = (f != torch.tensor([1.0, 1.0, 1.0, 0.0])).any(dim=1)
    assert abs(jittered.float().mean().item() - 0.8) < 0.015
    for column, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1)]):
        drawn = f[jittered, column].numpy()
        assert lo <= drawn.min() and drawn.max() <= hi
        assert stats.kstest(drawn, "uniform", args=(lo, hi - lo)).pvalue > 0.01
    perms = collections_count(p["order"])
    assert len(perms) == 24 and max(abs(c / n - 1 / 24) for c in perms.values()) < 0.01
    assert abs(p["gray"].float().mean().item() - 0.2) < 0.015
    blurred = p["sigma"] > 0
    assert abs(blurred.float().mean().item() - 0.5) < 0.015
    assert stats.kstest(p["sigma"][blurred].numpy(), "uniform", args=(0.1, 1.9)).pvalue > 0.01
    assert abs(p["flip"].float().mean().item() - 0.5) < 0.015


def collections_count(order: torch.Tensor) -> dict:
    from collections import Counter
    return Counter(tuple(row) for row in order.tolist())


def torchvision_view(img: torch.Tensor, i: int, p: dict, recipe) -> torch.Tensor:
    """Sample i the old way: torchvision.transforms.v2 functional ops with sample i's parameters."""
    F = v2.functional
    x = img.float() / 255
    f = p["factors"][i].tolist()
    if f != [1.0, 1.0, 1.0, 0.0]:
        ops = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
        for op in p["order"][i].tolist():
            x = ops[op](x, f[op])
    if p["gray"][i]:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    sigma = float(p["sigma"][i])
    if sigma > 0:
        x = F.gaussian_blur(x, [recipe.blur_kernel] * 2, [sigma, sigma])
    if p["flip"][i]:  # the recipe flips last
        x = F.horizontal_flip(x)
    return F.normalize(x, list(recipe.mean), list(recipe.std))


def test_a_device_view_equals_torchvision_on_the_same_parameters():
    torch.manual_seed(0)
    views = CropViews(64, 3)
    batch = torch.stack([v for _ in range(12) for v in views(photo_jpeg())])
    recipe = device_recipe("moco_v2", 64, 3)
    p = da.draw_params(recipe, len(batch), "cpu", torch.Generator().manual_seed(3))
    assert p["gray"].any() and (p["sigma"] > 0).any() and (p["factors"][:, 3] != 0).any()
    assert p["flip"].any() and not p["flip"].all()
    new = da.apply(recipe, batch, p)
    old = torch.stack([torchvision_view(img.permute(2, 0, 1), i, p, recipe) for i, img in enumerate(batch)])
    assert new.shape == old.shape and new.dtype == torch.float32
    assert (new - old).abs().max().item() < 2e-3  # float rounding only (normalised units)


def test_moco_v1_recipe_jitters_always_after_grayscale():
    recipe = device_recipe("moco_v1", 224, 3)
    assert recipe.gray_first and recipe.jitter_p == 1.0 and recipe.blur_p == 0.0
    assert recipe.jitter == (0.4, 0.4, 0.4, 0.4)
    assert device_recipe("digits", 32, 1) is None  # the host finishes digit views


XLA_SCRIPT = """
import json, sys, torch
from moco_xla.runtime import make_runtime
from moco_xla.data import device_augment as da
from moco_xla.data.transforms import device_recipe
rt = make_runtime("xla")
aug = da.DeviceAugment(device_recipe("moco_v2", 16, 3))
outs, compiles = [], []
for step in range(4):
    batch = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8).to(rt.device)
    y = aug(batch)
    rt.mark_step()
    rt.wait()
    compiles.append(rt.counters())
    outs.append(y.cpu())
first = compiles[1]
json.dump({"after": {k: compiles[-1][k] - first[k] for k in first}, "dtype": str(outs[0].dtype),
           "finite": all(bool(torch.isfinite(o).all()) for o in outs)}, open(sys.argv[1], "w"))
"""


@pytest.mark.needs_xla
def test_device_augment_compiles_once_on_xla(tmp_path):
    out = tmp_path / "xla.json"
    env = {**os.environ, "PJRT_DEVICE": "CPU", "XLA_FLAGS": "--xla_backend_optimization_level=0",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", XLA_SCRIPT, str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    # steps 3 and 4 (the transfer of the batch, the augmentation, the read-back of the result
    # for the test) reuse the graphs of step 2: nothing recompiles, nothing falls back to the host
    assert r["after"]["compiles"] == 0 and r["after"]["fallback_ops"] == 0, r
    assert r["dtype"] == "torch.float32" and r["finite"]


@pytest.mark.filterwarnings("ignore:possible collapse")  # two epochs of a tiny model: not the point here
def test_device_augmented_training_resumes_mid_epoch_exactly(tmp_path):
    """moco_v2 on colour JPEGs (uint8 views, colour on the device): a run resumed from a
    mid-epoch checkpoint ends bit-identical to the uninterrupted run, so the device draws
    come back with the checkpoint's RNG."""
    sys.path.insert(0, str(ROOT / "tests"))
    from data_fixtures import write_image_folder
    from reliability_fns import assert_same_training_state, final_checkpoint, run_inprocess

    from moco_xla.checkpoint import load_checkpoint
    write_image_folder(tmp_path / "data", classes=2, per_class=16, size=40, fmt="jpg")
    args = ["--config", "tiny", "--backend", "cpu", "--cores", "1"] + [a for s in (
        "data.dataset=folder", f"data.root={tmp_path / 'data'}", "data.augment=moco_v2", "data.image_size=16",
        "model.in_channels=3", "train.batch_size=8", "train.epochs=2", "checkpoint.every_steps=1",
        "checkpoint.keep=10", "eval.knn_every=0", "moco.K=32") for a in ("--set", s)]
    assert run_inprocess(args + ["--out", str(tmp_path / "straight")]) == 0
    ckpt = tmp_path / "straight" / "checkpoints" / "ckpt-000000001.pt"
    assert load_checkpoint(ckpt)["step_in_epoch"] > 0  # mid-epoch: the loader and the RNG resume inside it
    assert run_inprocess(args + ["--out", str(tmp_path / "resumed"), "--resume", str(ckpt)]) == 0
    assert_same_training_state(final_checkpoint(tmp_path / "straight"), final_checkpoint(tmp_path / "resumed"))
