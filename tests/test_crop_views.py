"""CropViews' host path: the JPEG header read without PIL gives the size PIL reads, its decode
(simplejpeg, channels last) gives the pixels decode_bytes gives, the decode of the crops' rectangle
alone (images.decode_jpeg_region) gives the whole decode's pixels there and the same views, and a
view made from a full decode
is torchvision's RandomResizedCrop (v2.functional) on the same random draws (to the rounding of
the intermediate image), shipped channels last (the flip is the device's: tests/test_augment.py)."""
from __future__ import annotations

import io

import pytest
import torch
from torchvision.transforms import v2

from moco_xla.data import images
from moco_xla.data.images import BadImage, decode_bytes, decode_jpeg_pixels, decode_jpeg_region, jpeg_header
from moco_xla.data.transforms import CropViews, covering_rect, crop_params, dct_shrink, reduced_box


def photo(width: int = 500, height: int = 375):
    from PIL import Image
    from sklearn.datasets import load_sample_images
    return Image.fromarray(load_sample_images().images[1][:height, :width])


def encode(img, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **options)
    return buf.getvalue()


def jpeg_variants() -> list[bytes]:
    """One photo as JPEG files come: baseline, progressive, gray, 4:4:4, EXIF and ICC segments,
    1x1, optimised Huffman tables, and CMYK (no luma-chroma)."""
    from PIL import Image
    img = photo(413, 297)
    exif = Image.Exif()
    exif[0x0112] = 6  # an orientation tag: the stored size is still what the decoders return
    return [encode(img, quality=90), encode(img, quality=75, progressive=True),
            encode(img.convert("L"), quality=90), encode(img, quality=95, subsampling=0),
            encode(img, quality=90, exif=exif.tobytes(), icc_profile=b"\0" * 3000),
            encode(img.resize((1, 1)), quality=90), encode(img, quality=90, optimize=True),
            encode(img.convert("CMYK"), quality=90)]


def test_jpeg_header_reads_what_pil_reads():
    from PIL import Image
    variants = jpeg_variants()
    for data in variants:
        with Image.open(io.BytesIO(data)) as im:
            assert jpeg_header(data)[:2] == im.size
    assert [jpeg_header(data).colorspace for data in variants[1:3]] == ["YCbCr", "Gray"]
    assert jpeg_header(variants[-1]).colorspace == "CMYK"
    assert jpeg_header(variants[0][:20]) is None  # cut before the frame header
    png = io.BytesIO()
    photo(40, 30).save(png, "PNG")
    assert jpeg_header(png.getvalue()) is None and jpeg_header(b"") is None
    assert jpeg_header(b"\xff\xd8\x00\x01") is None


def libjpeg_turbo_reference(data: bytes, channels: int) -> torch.Tensor:
    """The JPEG decoded by another libjpeg-turbo caller: torchvision.io where its (deprecated)
    decoders remain, else PIL; neither applies the EXIF orientation."""
    try:
        from torchvision.io import ImageReadMode, decode_image
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                            mode=ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB)
    except ImportError:
        import numpy as np
        from PIL import Image
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
        return torch.from_numpy(arr.copy()).reshape(arr.shape[0], arr.shape[1], channels).permute(2, 0, 1)


def test_jpegs_decode_to_the_same_pixels_with_any_torch():
    """decode_bytes (simplejpeg for luma-chroma and gray JPEGs) gives the stored image, never
    turned by its EXIF orientation (TorchCodec, the current-torch environment's decoder, turns
    it), with torchvision.io's pixels on every variant in 1 and 3 channels; CropViews' channels-last
    decode gives the same pixels; CMYK goes through the other decoders."""
    for data in jpeg_variants():
        header = jpeg_header(data)
        for channels in (1, 3):
            ours = decode_bytes(data, channels)
            assert ours.shape == (channels, header.height, header.width)
            if header.colorspace != "CMYK":
                assert torch.equal(ours, libjpeg_turbo_reference(data, channels))
            pixels = decode_jpeg_pixels(data, channels, header)
            assert pixels.dtype == torch.uint8 and pixels.is_contiguous()
            assert torch.equal(pixels[0].permute(2, 0, 1), ours)
    gray = jpeg_variants()[2]
    assert decode_bytes(gray).shape[0] == 1 and decode_bytes(jpeg_variants()[0]).shape[0] == 3  # as stored


def views_beside_torchvision(data: bytes, size: int, seeds: range):
    """(CropViews' view, torchvision's resized_crop of the full decode on the same crop draw, the
    draw (top, left, height, width))."""
    full = decode_bytes(data, 3)
    views = CropViews(size, 3)
    for seed in seeds:
        torch.manual_seed(seed)
        new = views(data)
        torch.manual_seed(seed)
        boxes = [crop_params(*full.shape[-2:]) for _ in range(2)]
        for view, (t, l, h, w) in zip(new, boxes):
            yield view, v2.functional.resized_crop(full, t, l, h, w, [size, size], antialias=True), (t, l, h, w)


def test_full_decode_views_match_torchvision_resized_crop_on_the_same_draws():
    """224-px views of a 500x375 JPEG (no crop keeps 448 px: always the full decode). A crop that
    shrinks on both sides is resized rows first (resized_crop), torchvision columns first: the
    same filter, so no pixel more than one grey level off and no bias; any other crop is exact."""
    draws_that_shrink_both_sides = 0
    for view, old, (_top, _left, h, w) in views_beside_torchvision(encode(photo(), quality=90), 224, range(12)):
        assert view.shape == (224, 224, 3) and view.is_contiguous()
        diff = view.permute(2, 0, 1).float() - old.float()
        if h > 224 and w > 224:
            draws_that_shrink_both_sides += 1
            assert diff.abs().max() <= 1 and diff.abs().mean() < 0.25 and abs(diff.mean()) < 0.01
        else:
            assert torch.equal(view.permute(2, 0, 1), old)
    assert 0 < draws_that_shrink_both_sides < 24


def large_photo():
    from PIL import Image
    from sklearn.datasets import load_sample_images
    return Image.fromarray(load_sample_images().images[1]).resize((1200, 800), Image.BICUBIC)


@pytest.mark.parametrize("size, make_photo", [(224, large_photo), (48, photo)])
def test_reduced_scale_jpeg_views_match_full_decode(size, make_photo):
    """Views whose crops both keep twice the view's pixels: decoded at 1/2-1/8 DCT scale, each
    box moved to the nearest reduced pixel, they show the crop a full decode shows (a view of
    another crop differs by tens of levels)."""
    errors, other_crop = [], []
    for view, old, (_t, _l, h, w) in views_beside_torchvision(encode(make_photo(), quality=90), size, range(8)):
        errors.append((view.permute(2, 0, 1).float() - old.float()).abs().mean().item())
        other_crop.append((view.permute(2, 0, 1).float() - old.flip(-1).float()).abs().mean().item())
    assert max(errors) < 5 and sum(errors) / len(errors) < 2.5, errors  # of 255: resampling, not another crop
    assert min(other_crop) > 3 * max(errors)


def test_every_kind_of_jpeg_decodes_at_half_scale_or_full_and_gives_views():
    """Progressive, gray, 4:4:4, EXIF/ICC, 1x1, optimised: the 1/2 DCT scale is the full decode
    averaged over 2x2 pixels but for resampling detail; CMYK (the other decoders) comes back full
    size; small views of each, in 1 and 3 channels, take whichever path and come out whole."""
    import torch.nn.functional as F
    for data in jpeg_variants():
        header = jpeg_header(data)
        for channels in (1, 3):
            full = decode_jpeg_pixels(data, channels, header)
            half = decode_jpeg_pixels(data, channels, header, 2)
            if header.colorspace == "CMYK" or header.width == 1:
                assert half.shape == full.shape
            else:
                assert half.shape[1:3] == (-(-header.height // 2), -(-header.width // 2))
                area = F.interpolate(full.permute(0, 3, 1, 2).float(), size=half.shape[1:3], mode="area")
                assert (half.permute(0, 3, 1, 2).float() - area).abs().mean() < 4
            torch.manual_seed(0)
            assert all(v.shape == (24, 24, channels) for v in CropViews(24, channels)(data))


def test_a_reduced_decode_is_the_dct_scale_and_each_box_edge_moves_half_a_reduced_pixel_at_most():
    data = encode(large_photo().crop((0, 0, 1001, 777)), quality=90)
    header = jpeg_header(data)
    for shrink in (2, 4, 8):
        reduced = tuple(decode_jpeg_pixels(data, 3, header, shrink).shape[1:3])
        assert reduced == (-(-777 // shrink), -(-1001 // shrink))
        sy, sx = reduced[0] / 777, reduced[1] / 1001
        torch.manual_seed(shrink)
        boxes = [crop_params(777, 1001) for _ in range(200)] + [(0, 0, 777, 1001), (776, 1000, 1, 1)]
        for box in boxes:
            t, lft, h, w = reduced_box(box, (777, 1001), reduced)
            assert 0 <= t < t + h <= reduced[0] and 0 <= lft < lft + w <= reduced[1]
            if min(box[2:]) >= 2 * shrink:  # a box of a pixel or two keeps one reduced pixel
                edges = (t - box[0] * sy, t + h - (box[0] + box[2]) * sy, lft - box[1] * sx, lft + w - (box[1] + box[3]) * sx)
                assert max(abs(e) for e in edges) <= 0.5 + 1e-9
    assert [dct_shrink(x) for x in (0.5, 1.99, 2, 3.9, 4, 7.9, 8, 30)] == [1, 1, 2, 2, 4, 4, 8, 8]


def test_encoded_and_decoded_inputs_give_the_same_views():
    """Bytes (size from the header) and the decoded tensor (size from its shape) draw the same
    crops; PNG bytes (no JPEG header) decode first and give views too."""
    data = encode(photo(), quality=90)
    views = CropViews(96, 3)
    for seed in range(4):
        torch.manual_seed(seed)
        from_bytes = views(data)
        torch.manual_seed(seed)
        from_tensor = views(decode_bytes(data, 3))
        for a, b in zip(from_bytes, from_tensor):
            if not torch.equal(a, b):  # a crop keeping 192 px took the reduced-scale decode
                assert (a.float() - b.float()).abs().mean() < 4
    png = io.BytesIO()
    photo(120, 90).save(png, "PNG")
    q, k = CropViews(32, 1)(png.getvalue())
    assert q.shape == k.shape == (32, 32, 1) and q.dtype == torch.uint8


def test_a_corrupt_jpeg_is_a_bad_image():
    data = encode(photo(), quality=90)
    with pytest.raises(BadImage):
        CropViews(32, 3)(data[:600])  # the header survives, the scan does not
    with pytest.raises(BadImage):
        CropViews(32, 3)(b"\xff\xd8\xff\xe0" + b"\x00" * 40)


def test_the_region_decoder_is_built():
    """pip install -e . (and the wheel: tests/test_packaging.py) compiles it with the system's libjpeg-turbo."""
    assert images._jpeg_region is not None


def test_a_region_decode_is_the_whole_decode_inside_the_padded_rectangle():
    """On every kind of JPEG, in 1 and 3 channels, at full and 1/2 DCT scale: the rectangle
    covering two random boxes, padded as CropViews pads it, holds the whole decode's pixels
    exactly at every pixel of both boxes; its rows are the rectangle's, its left edge at most
    15 pixels left of the rectangle's. Unpadded, the chroma upsampling at the rectangle's edge
    changes edge pixels (what the padding is for). CMYK is left to the whole-image decoders."""
    unpadded_differs = False
    for data in jpeg_variants():
        header = jpeg_header(data)
        for channels in (1, 3):
            for shrink in (1, 2):
                if header.colorspace == "CMYK":
                    assert decode_jpeg_region(data, channels, header, shrink, (0, 0, 1, 1)) is None
                    continue
                whole = decode_jpeg_pixels(data, channels, header, shrink)
                size = tuple(whole.shape[1:3])
                torch.manual_seed(shrink * 10 + channels)
                for _ in range(6):
                    boxes = [crop_params(*size, (0.05, 0.6)) for _ in range(2)]
                    for pad in (2, 0):
                        rect = covering_rect(boxes, size, pad)
                        pixels, top, left = decode_jpeg_region(data, channels, header, shrink, rect)
                        assert top == rect[0] and pixels.shape[1] == rect[2] and pixels.shape[3] == channels
                        assert 0 <= rect[1] - left < 16 and left + pixels.shape[2] >= rect[1] + rect[3]
                        for t, lft, h, w in boxes:
                            same = torch.equal(pixels[:, t - top:t - top + h, lft - left:lft - left + w],
                                               whole[:, t:t + h, lft:lft + w])
                            assert same or pad == 0, (header, channels, shrink, rect)
                            unpadded_differs |= not same
    assert unpadded_differs


def test_a_damaged_jpeg_or_a_rectangle_outside_is_left_to_the_whole_decode():
    data = encode(photo(), quality=90)
    header = jpeg_header(data)
    assert decode_jpeg_region(data[:600], 3, header, 1, (0, 0, 375, 500)) is None  # the scan is cut
    assert decode_jpeg_region(data, 3, header, 1, (300, 0, 76, 500)) is None  # one row past the bottom
    assert decode_jpeg_region(data, 3, header, 3, (0, 0, 10, 10)) is None  # not a DCT scale
    assert decode_jpeg_region(data, 3, header._replace(width=501), 1, (0, 0, 10, 10)) is None  # a header that lied


@pytest.mark.parametrize("size, make_photo, channels", [(224, photo, 3), (224, large_photo, 3), (48, photo, 1)])
def test_views_from_the_crops_rectangle_equal_views_from_the_whole_decode(monkeypatch, size, make_photo, channels):
    """CropViews with the region decoder and without it (the whole image decoded, as where the
    module is not built), on the same draws: the same views, pixel for pixel, at full scale (500x375
    at 224 px) and at reduced DCT scales (1200x800 at 224 px, 500x375 at 48 px)."""
    data = encode(make_photo(), quality=90)
    assert decode_jpeg_region(data, channels, jpeg_header(data), 1, (0, 0, 8, 8)) is not None
    views = CropViews(size, channels)
    with_region = []
    for seed in range(6):
        torch.manual_seed(seed)
        with_region.append(views(data))
    monkeypatch.setattr(images, "_jpeg_region", None)
    for seed in range(6):
        torch.manual_seed(seed)
        for a, b in zip(with_region[seed], views(data)):
            assert a.shape == (size, size, channels) and torch.equal(a, b), seed


FUZZ = """
import io, random, sys
from moco_xla.data.images import decode_jpeg_region, jpeg_header
good, progressive = (open(p, 'rb').read() for p in sys.argv[1:3])
rng, counts = random.Random(0), {'pixels': 0, 'none': 0}
for i in range(600):
    data = bytearray(progressive if i % 2 else good)
    if i % 3 == 0:  # bytes changed anywhere after the start-of-image marker
        for _ in range(rng.randint(1, 20)):
            data[rng.randrange(2, len(data))] = rng.randrange(256)
    elif i % 3 == 1:  # cut short
        data = data[:rng.randrange(2, len(data))]
    else:  # the header's segments overwritten
        pos = rng.randrange(2, 700)
        data[pos:pos + 4] = bytes(rng.randrange(256) for _ in range(4))
    header = jpeg_header(bytes(data))
    if header is None:
        continue
    for shrink in (1, 2):
        h, w = -(-header.height // shrink), -(-header.width // shrink)
        top, left = rng.randrange(h), rng.randrange(w)
        rect = (top, left, 1 + rng.randrange(h - top), 1 + rng.randrange(w - left))
        out = decode_jpeg_region(bytes(data), 3, header, shrink, rect)
        counts['none' if out is None else 'pixels'] += 1
print(counts['pixels'], counts['none'])
"""


def test_damaged_jpegs_never_crash_the_region_decoder(tmp_path):
    """600 damaged baseline and progressive JPEGs (bytes changed, cut short, header segments
    overwritten), rectangles anywhere: each decode returns pixels or None (libjpeg's errors and
    warnings become None), never a crash of the process (run apart, so a crash fails this test)."""
    import subprocess
    import sys
    img = photo(400, 300)
    (tmp_path / "good.jpg").write_bytes(encode(img, quality=90))
    (tmp_path / "progressive.jpg").write_bytes(encode(img, quality=80, progressive=True))
    p = subprocess.run([sys.executable, "-c", FUZZ, str(tmp_path / "good.jpg"), str(tmp_path / "progressive.jpg")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    pixels, none = map(int, p.stdout.split())
    assert pixels > 50 and none > 50  # both outcomes occur: decodable damage and refused damage
