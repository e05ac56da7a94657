"""Image bytes <-> uint8 tensors [C, H, W].

Decoding goes through TorchCodec's image decoders where torchcodec (>= 0.16, for torch >= 2.11) is
installed, else through torchvision.io, whose image decoders torchvision 0.29 deprecated in their
favour (both libjpeg-turbo / libpng, no PIL round trip, the same pixels), and falls back to PIL for
the formats they lack (BMP, TIFF, PPM, ...). A file that none can decode raises ``BadImage`` with a
short reason; callers name the path. PNG encoding (shards of decoded images) is PIL's.
"""
from __future__ import annotations

import functools
import io
from typing import Callable

import torch


class BadImage(ValueError):
    """Image bytes that cannot be decoded."""


def decode_bytes(data: bytes, channels: int | None = None) -> torch.Tensor:
    """uint8 [C, H, W]; ``channels`` 1 or 3 converts, None keeps gray as 1 and colour as 3."""
    if not data:
        raise BadImage("empty file")
    mode = {1: "GRAY", 3: "RGB"}.get(channels, "UNCHANGED")
    try:
        img = decoder()[1](torch.frombuffer(bytearray(data), dtype=torch.uint8), mode)
    except (RuntimeError, ValueError):
        img = _decode_pil(data, channels)
    return _fix_channels(img)


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


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers (DHT, JPG, DAC are not)
_STANDALONE_MARKERS = frozenset([0x01, *range(0xD0, 0xD9)])  # TEM, RSTn, SOI: no length field


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, walking its segments (nothing decoded, no PIL:
    a few microseconds). None where ``data`` is not a JPEG or its frame header cannot be read
    (truncated, or a height left to a DNL segment): decode it to learn its size."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _SOF_MARKERS:
            height, width = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            return (width, height) if width and height else None
        elif marker in _STANDALONE_MARKERS:
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def sniff_format(data: bytes) -> str | None:
    """'jpg' or 'png' from magic bytes, else None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return None
