"""Image bytes <-> uint8 tensors [C, H, W].

JPEGs in the colour spaces photos use (luma-chroma, gray) decode with simplejpeg: libjpeg-turbo,
accurate DCT, smooth chroma upsampling, the EXIF orientation not applied (as PIL's ImageFolder
loader and torchvision.io leave it), so the pixels are the same with any torch; where only a
rectangle of one is needed (CropViews' two crops), the compiled ``_jpeg_region`` decodes that
rectangle alone with the system's libjpeg-turbo, the same pixels. Other images go
through TorchCodec's image decoders where torchcodec (>= 0.16, for torch >= 2.11) is installed,
else through torchvision.io, whose image decoders torchvision 0.29 deprecated in their favour,
and fall back to PIL for the formats they lack (BMP, TIFF, PPM, ...). A file that none can decode
raises ``BadImage`` with a short reason; callers name the path. PNG encoding (shards of decoded
images) is PIL's.
"""
from __future__ import annotations

import functools
import io
from typing import Callable, NamedTuple

import simplejpeg
import torch

try:
    from . import _jpeg_region
except ImportError:  # built without a C compiler or libjpeg's headers: whole-image decodes
    _jpeg_region = None


class BadImage(ValueError):
    """Image bytes that cannot be decoded."""


def decode_bytes(data: bytes, channels: int | None = None) -> torch.Tensor:
    """uint8 [C, H, W]; ``channels`` 1 or 3 converts, None keeps gray as 1 and colour as 3."""
    if not data:
        raise BadImage("empty file")
    pixels = _decode_jpeg(data, channels, jpeg_header(data))
    return _decode_other(data, channels) if pixels is None else pixels.permute(2, 0, 1)


def _decode_other(data: bytes, channels: int | None) -> torch.Tensor:
    """What simplejpeg does not decode: TorchCodec or torchvision.io, else PIL."""
    mode = {1: "GRAY", 3: "RGB"}.get(channels, "UNCHANGED")
    try:
        img = decoder()[1](torch.frombuffer(bytearray(data), dtype=torch.uint8), mode)
    except (RuntimeError, ValueError):
        img = _decode_pil(data, channels)
    return _fix_channels(img)


class JpegHeader(NamedTuple):
    width: int
    height: int
    colorspace: str  # libjpeg-turbo's: "YCbCr", "Gray", "RGB", "CMYK", "YCCK"


def jpeg_header(data: bytes) -> JpegHeader | None:
    """Size and colour space from a JPEG's header (simplejpeg: libjpeg-turbo reads the markers up
    to the first scan, nothing decoded, no PIL: a microsecond or two). None where ``data`` is not a
    JPEG, or its header cannot be read (truncated): decode it to learn its size."""
    try:
        height, width, colorspace, _subsampling = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return JpegHeader(width, height, colorspace) if width and height else None


def decode_jpeg_pixels(data: bytes, channels: int, header: JpegHeader, shrink: int = 1) -> torch.Tensor:
    """uint8 [1, H, W, C] of a JPEG whose header the caller has read, channels last as
    libjpeg-turbo writes them (the layout torch's resize kernel reads fastest): decode_bytes'
    pixels without the turn to channels-first (transforms.CropViews).

    ``shrink`` 2, 4 or 8 decodes at 1/shrink of the size in the DCT (libjpeg-turbo's scaled
    IDCT: [ceil(height / shrink), ceil(width / shrink)], cheaper than the full decode; the scales
    between 1/2 and 1 cost more than it). A JPEG simplejpeg does not decode comes back full size."""
    pixels = _decode_jpeg(data, channels, header, shrink)
    if pixels is None:  # CMYK, or damaged: decode_bytes' other decoders
        pixels = _decode_other(data, channels).permute(1, 2, 0).contiguous()
    return pixels[None]


def decode_jpeg_region(data: bytes, channels: int, header: JpegHeader, shrink: int,
                       rect: tuple[int, int, int, int]) -> tuple[torch.Tensor, int, int] | None:
    """uint8 [1, height, w, C] of the rectangle ``rect`` (top, left, height, width, in the pixels of the
    decode at 1/shrink) of a JPEG whose header the caller has read, and the (top, left) of its
    first pixel: all of its rows, and its columns from left moved down to an iMCU boundary (at
    most 15 pixels). libjpeg-turbo decodes no row below it and skips the IDCT and colour
    conversion of the rows above it and of the columns outside it (_jpeg_region.c).

    Its pixels are the whole-image decode's (decode_jpeg_pixels) except one pixel in from the
    edges, where the chroma upsampling sees the rectangle's edge as the image's: pad ``rect``
    by a pixel or two where it is not the image's edge. None where the module is not built, the
    JPEG is not luma-chroma or gray (CMYK), or libjpeg stops or warns on it: decode it whole."""
    if _jpeg_region is None or header.colorspace not in ("YCbCr", "Gray"):
        return None
    full_height, full_width = dct_scaled_size(header, shrink)
    try:
        pixels, left, width = _jpeg_region.decode(data, channels == 1, shrink, full_height, full_width, *rect)
    except ValueError:
        return None
    return torch.frombuffer(pixels, dtype=torch.uint8).view(1, rect[2], width, channels), rect[0], left


def dct_scaled_size(header: JpegHeader, shrink: int) -> tuple[int, int]:
    """[height, width] of a JPEG decoded at 1/shrink in the DCT (libjpeg-turbo rounds up)."""
    return -(-header.height // shrink), -(-header.width // shrink)


def _decode_jpeg(data: bytes, channels: int | None, header: JpegHeader | None, shrink: int = 1) -> torch.Tensor | None:
    """uint8 [H, W, C] of a luma-chroma or gray JPEG (simplejpeg); None for anything else (not a
    JPEG, CMYK) and for a file libjpeg-turbo stops on, which the other decoders then decode as
    far as they can, or name what is wrong."""
    if header is None or header.colorspace not in ("YCbCr", "Gray"):
        return None
    gray = channels == 1 or (channels is None and header.colorspace == "Gray")
    size = dict(zip(("min_height", "min_width"), dct_scaled_size(header, shrink))) if shrink > 1 else {}
    try:
        return torch.from_numpy(simplejpeg.decode_jpeg(data, "GRAY" if gray else "RGB", **size))
    except ValueError:
        return None


@functools.lru_cache(maxsize=1)
def decoder() -> tuple[str, Callable[[torch.Tensor, str], torch.Tensor]]:
    """(name, decode(encoded uint8 tensor, mode)): TorchCodec's where it loads, else torchvision.io's."""
    try:
        from torchcodec.decoders import decode_image as codec_decode
        return "torchcodec", lambda encoded, mode: codec_decode(encoded, mode=mode)
    except (ImportError, OSError, RuntimeError):  # not installed, or its libraries do not load with this torch
        from torchvision.io import ImageReadMode, decode_image as tv_decode
        return "torchvision.io", lambda encoded, mode: tv_decode(encoded, mode=ImageReadMode[mode])


def _decode_pil(data: bytes, channels: int | None) -> torch.Tensor:
    import numpy as np
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as im:
            gray = im.mode in ("1", "L", "I", "I;16", "F", "LA")
            im = im.convert("L" if channels == 1 or (channels is None and gray) else "RGB")
            arr = np.asarray(im)
    except UnidentifiedImageError:
        raise BadImage("not a recognised image format") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImage(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def _fix_channels(img: torch.Tensor) -> torch.Tensor:
    """Drop alpha: gray+alpha -> gray, RGBA -> RGB."""
    if img.shape[0] == 2:
        return img[:1]
    if img.shape[0] == 4:
        return img[:3]
    return img


def decode_file(path: str, channels: int | None = None) -> torch.Tensor:
    with open(path, "rb") as f:
        return decode_bytes(f.read(), channels)


def encode_png(img: torch.Tensor) -> bytes:
    """Lossless PNG bytes of a uint8 [C, H, W] (C = 1 or 3) or [H, W] tensor (PIL's encoder: torchvision
    0.29 deprecated its own, and TorchCodec, its successor, needs torch >= 2.11)."""
    from PIL import Image
    pixels = img if img.dim() == 2 else img.permute(1, 2, 0).squeeze(-1)
    buf = io.BytesIO()
    Image.fromarray(pixels.contiguous().numpy()).save(buf, format="PNG")
    return buf.getvalue()


def sniff_format(data: bytes) -> str | None:
    """'jpg' or 'png' from magic bytes, else None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return None
