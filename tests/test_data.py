"""Datasets in their real on-disk formats, augmentations, map-style loaders and bad-input errors."""
from __future__ import annotations

import collections
import shutil
import string

import pytest
import torch
from torchvision.transforms import v2

from data_fixtures import (write_cifar10, write_emnist, write_image_folder, write_imagenet,
                           write_mnist)
from moco_xla import data
from moco_xla.config import load_config
from moco_xla.data.datasets import load_digits
from moco_xla.data.transforms import PRESETS, ToChannels, TwoCrops, eval_transform, pretrain_transform
from moco_xla.errors import UserError


def cfg_for(dataset: str, root=None, **data_over):
    overrides = [f"data.dataset={dataset}"] + ([f"data.root={root}"] if root is not None else [])
    overrides += [f"data.{k}={v}" for k, v in data_over.items()]
    return load_config("tiny", overrides)


def bar_row(label: int, size: int) -> int:
    """Row of the class bar drawn by data_fixtures.class_pattern."""
    return 1 + (label * 3) % (size - 3)


def assert_upright_digit(img: torch.Tensor, label: int) -> None:
    """The fixture pattern: bright left edge (cols 0-1) and the class bar at its row."""
    assert img.dtype == torch.uint8 and img.shape == (1, 28, 28)
    assert (img[0, :, 0] == 200).all(), "left edge missing: image is transposed or flipped"
    assert (img[0, bar_row(label, 28), 2:27] == 255).all(), f"no bar for label {label}: wrong label"


# ------------------------------------------------------------------ datasets

@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_mnist_idx_raw_and_gzip(tmp_path, gz):
    write_mnist(tmp_path, n=60, test_n=20, gz=gz)
    b = data.build(cfg_for("mnist", tmp_path))
    assert (len(b.bank), len(b.test), b.num_classes) == (60, 20, 10)
    raw = b.bank.base
    labels = collections.Counter(int(raw.targets[i]) for i in range(len(raw)))
    assert sorted(labels) == list(range(10))
    for i in range(0, 60, 7):
        img, y = raw[i]
        assert_upright_digit(img, y)


def test_mnist_root_may_be_the_raw_folder(tmp_path):
    write_mnist(tmp_path, n=20, gz=True)
    b = data.build(cfg_for("mnist", tmp_path / "MNIST" / "raw"))
    assert len(b.bank) == 20


def test_emnist_letters_upright_with_zero_based_labels(tmp_path):
    write_emnist(tmp_path, "letters", n=78, test_n=26, gz=True)
    b = data.build(cfg_for("emnist", tmp_path, split="letters"))
    assert b.num_classes == 26 and b.classes == list(string.ascii_lowercase)
    raw = b.bank.base
    assert sorted({int(y) for y in raw.targets}) == list(range(26))
    for i in range(len(raw)):
        img, y = raw[i]
        assert_upright_digit(img, y)  # the files store images transposed; the loader undoes it


def test_emnist_balanced_raw(tmp_path):
    write_emnist(tmp_path, "balanced", n=94, test_n=47)
    b = data.build(cfg_for("emnist", tmp_path, split="balanced"))
    assert (b.num_classes, len(b.bank), len(b.test)) == (47, 94, 47)
    img, y = b.test.base[3]
    assert_upright_digit(img, y)


def test_cifar10_python_batches(tmp_path):
    write_cifar10(tmp_path, n=50, test_n=20)
    b = data.build(cfg_for("cifar10", tmp_path, augment="small", image_size=32))
    assert (len(b.bank), len(b.test), b.num_classes) == (50, 20, 10)
    assert b.classes[0] == "airplane"
    for i in range(0, 50, 9):
        img, y = b.bank.base[i]
        hue = torch.tensor([(y * 97) % 256, (y * 53 + 80) % 256, (y * 181 + 160) % 256])
        diff = img[:, 31, 31].long() - hue // 2  # a noise-only corner: class colour / 2 + noise / 2
        assert img.shape == (3, 32, 32) and ((diff >= 0) & (diff < 20)).all(), (i, y)


def test_imagenet_val_labels_follow_train_classes(tmp_path):
    write_imagenet(tmp_path, classes=4, per_class=3, val_per_class=2, size=24)
    wnids = sorted(p.name for p in (tmp_path / "train").iterdir())
    shutil.rmtree(tmp_path / "val" / wnids[1])  # a val set missing a class must not shift labels
    b = data.build(cfg_for("imagenet", tmp_path, augment="moco_v2", image_size=16))
    assert b.num_classes == 4 and len(b.bank) == 12 and len(b.test) == 6
    for path, label in b.test.base.samples:
        assert wnids[label] in path
    img, _ = b.test[0]
    assert img.shape == (1, 16, 16) and img.dtype == torch.float32  # tiny config: 1 channel


def test_folder_single_directory_split_is_stratified_and_fixed(tmp_path):
    write_image_folder(tmp_path, classes=3, per_class=10, size=16, fmt="png")
    b1 = data.build(cfg_for("folder", tmp_path, test_fraction=0.3))
    b2 = data.build(cfg_for("folder", tmp_path, test_fraction=0.3))
    train, test = b1.bank.base.samples, b1.test.base.samples
    assert not set(train) & set(test) and len(train) + len(test) == 30
    assert collections.Counter(y for _, y in test) == {0: 3, 1: 3, 2: 3}
    assert test == b2.test.base.samples


# ------------------------------------------------------------------ transforms

@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("channels", [1, 3])
def test_pretrain_views_shape_dtype_and_differ(preset, channels):
    torch.manual_seed(0)
    img = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    q, k = TwoCrops(pretrain_transform(preset, 24, channels))(img)
    assert q.shape == k.shape == (channels, 24, 24) and q.dtype == torch.float32
    assert not torch.equal(q, k)
    e1, e2 = (eval_transform(preset, 24, channels)(img) for _ in range(2))
    assert e1.shape == (channels, 24, 24) and torch.equal(e1, e2)  # evaluation is deterministic


def test_digits_preset_never_flips():
    ops = pretrain_transform("digits", 16, 1).transforms
    assert not any(isinstance(t, v2.RandomHorizontalFlip) for t in ops)
    assert any(isinstance(t, v2.RandomHorizontalFlip) for t in pretrain_transform("moco_v2", 16, 3).transforms)


@pytest.mark.parametrize("crop_min_scale, whole", [("null", False), ("1.0", True)])
def test_crop_min_scale_reaches_the_digits_views(crop_min_scale, whole):
    """data.crop_min_scale=1: every pre-training crop is the whole digit, so the views Gaussian blur
    leaves alone (half of them) are the evaluation image; the preset's own 0.4-1 crops (null) almost never are."""
    cfg = load_config("digits", ["data.augment=digits", f"data.crop_min_scale={crop_min_scale}"])
    bundle = data.build(cfg)
    torch.manual_seed(0)
    same = [torch.equal(view, bundle.bank[i][0]) for i in range(100) for view in bundle.pretrain[i][0]]
    share = sum(same) / len(same)
    assert 0.35 < share < 0.65 if whole else share < 0.05, share


def test_digits_fine_draws_its_crops_on_the_views_grid():
    """digits_fine upsamples the 8x8 digit to the view's 16 px before the random resized crop: crops of
    80-100% then take several times the distinct boxes they take on the stored grid (blur left out)."""
    digit = load_digits()[0].images[0]
    distinct = {}
    for preset in ("digits", "digits_fine"):
        geometric = v2.Compose([t for t in pretrain_transform(preset, 16, 1, 0.8).transforms
                                if not isinstance(t, (v2.RandomApply, v2.ToDtype, v2.Normalize))])
        torch.manual_seed(0)
        distinct[preset] = len({tuple(geometric(digit).flatten().tolist()) for _ in range(300)})
    assert distinct["digits"] <= 12 and distinct["digits_fine"] >= 30, distinct


def test_channel_conversion():
    gray = torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8)
    rgb = ToChannels(3)(gray)
    assert rgb.shape == (3, 8, 8) and all(torch.equal(rgb[c], gray[0]) for c in range(3))
    colour = torch.zeros(3, 8, 8, dtype=torch.uint8)
    colour[1] = 200
    assert ToChannels(1)(colour).shape == (1, 8, 8) and 0 < int(ToChannels(1)(colour).max()) < 200



def test_decoder_is_torchcodec_where_installed_with_the_pixels_of_torchvision_and_pil():
    """torchvision 0.29 deprecated its image codecs for TorchCodec's: where torchcodec loads, images
    other than photo JPEGs (simplejpeg's: tests/test_crop_views.py) decode through it (the
    current-torch CI environment installs it), and JPEGs decode to TorchCodec's pixels too."""
    import importlib.util
    import io

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from moco_xla.data.images import decode_bytes, decoder, encode_png
    name, decode = decoder()
    assert name == ("torchcodec" if importlib.util.find_spec("torchcodec") else "torchvision.io")
    photo = load_sample_images().images[0][:120, :160]
    for source, channels in (("RGB", 3), ("L", 1)):
        png = encode_png(torch.from_numpy(np.asarray(Image.fromarray(photo).convert(source)).copy()).reshape(
            120, 160, channels).permute(2, 0, 1))
        with Image.open(io.BytesIO(png)) as im:
            pil = torch.from_numpy(np.asarray(im).copy()).reshape(120, 160, channels).permute(2, 0, 1)
        assert torch.equal(decode_bytes(png), pil)  # lossless both ways, in the image's own channels
        buf = io.BytesIO()
        Image.fromarray(photo).convert(source).save(buf, format="JPEG", quality=90)
        jpeg = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        ours = decode_bytes(buf.getvalue(), 3)
        assert ours.shape == (3, 120, 160) and torch.equal(ours, decode(jpeg, "RGB"))
        try:
            from torchvision.io import ImageReadMode, decode_image
        except ImportError:  # a torchvision whose deprecated codecs are gone
            continue
        assert torch.equal(ours, decode_image(jpeg, mode=ImageReadMode.RGB))  # libjpeg-turbo in both


# ------------------------------------------------------------------ loaders

def test_map_style_pretrain_loader_once_per_epoch(tmp_path):
    write_mnist(tmp_path, n=100, test_n=10)
    cfg = cfg_for("mnist", tmp_path)
    b = data.build(cfg)
    b.pretrain.transform = TwoCrops(lambda img: img.float())  # keep pixels to identify samples
    seen, steps = [], []
    for rank in range(2):
        loader = data.pretrain_loader(b.pretrain, 8, rank, 2, seed=0)
        loader.set_epoch(1)
        batches = list(loader)
        steps.append(len(batches))
        seen += [tuple(x.flatten()[:200].tolist()) for q, _ in batches for x in q]
    assert steps == [6, 6] and len(seen) == 96 and len(set(seen)) == 96


def test_bad_image_error_names_path_and_skip_counts(tmp_path):
    write_image_folder(tmp_path, classes=2, per_class=6, size=16, fmt="jpg")
    bad = sorted((tmp_path / "class_01").iterdir())[2]
    bad.write_bytes(b"not an image at all")
    cfg = cfg_for("folder", tmp_path, test_fraction=0.25)
    b = data.build(cfg)
    with pytest.raises(UserError, match=str(bad)) as e:
        list(data.eval_loader(b.bank, 4, 0, 1, workers=2))
    assert "\n" not in str(e.value)
    cfg.data.on_bad_sample = "skip"
    b = data.build(cfg)
    with pytest.warns(RuntimeWarning, match="skipping bad sample"):
        batches = list(data.eval_loader(b.bank, 4, 0, 1, workers=0))
    batches += list(data.eval_loader(b.test, 4, 0, 1, workers=2))
    assert all(x.shape == (4, 1, 16, 16) for x, _, _ in batches)
    assert b.skipped == 1  # counted once, whichever split and process held the file


# ------------------------------------------------------------------ bad input before training

def test_check_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    write_imagenet(tmp_path / "flatval", classes=2, per_class=2, val_per_class=1, size=8)
    for d in (tmp_path / "flatval" / "val").iterdir():
        for f in d.iterdir():
            f.rename(tmp_path / "flatval" / "val" / f.name)
        d.rmdir()
    (tmp_path / "idx" / "MNIST" / "raw").mkdir(parents=True)
    (tmp_path / "idx" / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03junk")
    cases = [  # (config, message, whether the message names data.root)
        (cfg_for("mnist", tmp_path / "missing"), "does not exist", True),
        (cfg_for("folder", tmp_path / "empty"), "is empty", True),
        (cfg_for("imagenet", tmp_path / "empty"), "no train/ folder", True),
        (cfg_for("imagenet", tmp_path / "flatval"), "holds images but no class folders", True),
        (cfg_for("cifar10", tmp_path / "empty"), "no CIFAR-10 python batches", True),
        (cfg_for("mnist", tmp_path / "idx"), "t10k-images-idx3-ubyte", True),
        (cfg_for("mnist"), "needs data.root", False),
        (cfg_for("digits", tmp_path / "empty"), "holds no shards", True),
        (cfg_for("emnist", tmp_path / "empty", split="bogus"), "data.split='bogus'.*valid: balanced", False),
        (cfg_for("imagenet-2k", tmp_path), "unknown dataset 'imagenet-2k'.*valid: digits, mnist", False),
    ]
    for cfg, message, names_root in cases:
        with pytest.raises(UserError, match=message) as e:
            data.check(cfg)
        assert "\n" not in str(e.value)
        assert not names_root or str(cfg.data.root) in str(e.value)


def test_truncated_idx_file(tmp_path):
    write_mnist(tmp_path, n=20)
    f = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(UserError, match="train-images-idx3-ubyte is truncated"):
        data.build(cfg_for("mnist", tmp_path))


def test_launch_stops_on_bad_root_with_one_line(tmp_path, capsys):
    from moco_xla.launch import main
    code = main(["--config", "tiny", "--set", "data.dataset=cifar10", "--set", f"data.root={tmp_path}/nope",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: data.root {tmp_path}/nope does not exist"
    assert not (tmp_path / "run").exists()


def test_persistent_workers_survive_a_truncated_epoch(tmp_path):
    """max_steps_per_epoch stops an epoch early; the next epoch must reuse the same workers."""
    write_mnist(tmp_path, n=64, test_n=10)
    b = data.build(cfg_for("mnist", tmp_path))
    loader = data.pretrain_loader(b.pretrain, 8, 0, 1, seed=0, workers=2, max_steps=2)
    for epoch in range(3):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 2 and batches[0][0].shape == (8, 1, 16, 16)
