"""Handwriting augmentations: shape, dtype and range kept, seeded-deterministic, bounded changes; the presets train."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from moco_xla.data.handwriting import ElasticDistortion, StrokeWidth, dilate, erode, handwriting_ops
from moco_xla.data.transforms import pretrain_transform


def stroke(size: int = 28) -> torch.Tensor:
    """A float 'digit' in [0, 1]: a 3-px vertical bar and a 2-px horizontal bar."""
    img = torch.zeros(1, size, size)
    img[0, size // 5: -size // 5, size // 2 - 1: size // 2 + 2] = 1.0
    img[0, size // 3: size // 3 + 2, size // 4: -size // 4] = 0.7
    return img


def seeded(op, img: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return op(img)


OPS = {
    "elastic": ElasticDistortion(28, p=1.0),
    "thicker": StrokeWidth(p_thicker=1.0, p_thinner=0.0),
    "thinner": StrokeWidth(p_thicker=0.0, p_thinner=1.0),
    "erasing": v2.RandomErasing(p=1.0, scale=(0.02, 0.1), ratio=(0.5, 2.0), value=0),
}


@pytest.mark.parametrize("name", list(OPS))
def test_op_keeps_shape_dtype_range_and_is_seeded(name):
    op, img = OPS[name], tv_tensors.Image(stroke())
    out = seeded(op, img, 0)
    assert out.shape == img.shape and out.dtype == img.dtype and isinstance(out, tv_tensors.Image)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(out, seeded(op, img, 0))
    change = (out - img).abs()
    assert 0 < float(change.mean()) < 0.1  # it changes the digit, by a small amount
    if name != "thicker":  # a thicker pen adds ink next to strokes, never takes it away
        assert not torch.equal(out, seeded(op, img, 1))


def test_stroke_width_and_elastic_change_the_image_the_way_they_should():
    img = stroke()
    assert float(dilate(img).sum()) > float(img.sum()) > float(erode(img).sum())
    assert torch.equal(erode(dilate(img))[0, 8:20, 8:20] >= img[0, 8:20, 8:20], torch.ones(12, 12, dtype=torch.bool))
    thicker = seeded(OPS["thicker"], img, 0)
    assert float(img.sum()) < float(thicker.sum()) <= float(dilate(img).sum())
    # elastic: ink moves about 1-2 px, so the total stays close and the displacement field is that size
    warped = seeded(OPS["elastic"], img, 3)
    assert math.isclose(float(warped.sum()), float(img.sum()), rel_tol=0.25)
    torch.manual_seed(0)
    disp = torch.stack([OPS["elastic"].field(28, 28) for _ in range(50)])
    assert 0.5 < float(disp.std()) < 3.0 and disp.shape == (50, 1, 28, 28, 2)


def test_elastic_probability_and_identity_at_zero_alpha():
    img = stroke(16)
    never = ElasticDistortion(16, p=0.0)
    assert torch.equal(never(img), img)
    still = ElasticDistortion(16, p=1.0)
    still.alpha = 0.0  # no displacement: the resampling alone must give the image back
    torch.testing.assert_close(still(img), img, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", ["handwriting", "handwriting_crop"])
def test_preset_views_are_normalised_seeded_and_differ(preset):
    t = pretrain_transform(preset, 28, 1)
    img = (stroke() * 255).to(torch.uint8)
    a, b = seeded(t, img, 0), seeded(t, img, 1)
    assert a.shape == (1, 28, 28) and a.dtype == torch.float32
    assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0
    assert torch.equal(a, seeded(t, img, 0)) and not torch.equal(a, b)
    with pytest.raises(ValueError, match="valid: handwriting, handwriting_crop"):
        handwriting_ops("handwritting", 28, 3, (0.4, 1.0))


def test_handwriting_preset_trains_on_the_tiny_config(tmp_path):
    from moco_xla.config import load_config
    from moco_xla.runtime import make_runtime
    from moco_xla.train import train
    cfg = load_config("tiny", ["data.augment=handwriting", "train.epochs=1", "train.max_steps_per_epoch=3"])
    summary = train(cfg, make_runtime("local"), tmp_path)
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    assert 0 < summary["knn_top1"] <= 100
