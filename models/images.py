"""The one image decoder: ingest validation, training, evaluation and serving all see the same pixels.

``decode`` turns the bytes of any accepted file into an upright 8-bit RGB image, by the real range of
what the file stores, so that a model never learns from pixels its server would see differently:

- 8-bit modes (``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``): Pillow's own
  conversion to RGB, so an 8-bit RGB image decodes to exactly ``Image.open(f).convert("RGB")``.
- Integers wider than 8 bits are scaled by the full range of their stored type, never clipped (the
  rule of scikit-image's ``img_as_ubyte``): unsigned n-bit ``0..2**n-1`` → ``0..255`` (16-bit PNG/TIFF
  ``I;16*``: ``v / 257``); signed n-bit ``0..2**(n-1)-1`` → ``0..255`` with negatives black. The type
  comes from the TIFF's BitsPerSample/SampleFormat; a mode ``I`` image without them is Pillow's int32.
- Floats (``F``) are taken as ``0..1`` (the convention of float images and of ``ToTensor``), clipped
  outside it, NaN black. Scaling each image by its own min/max was rejected: it would erase brightness,
  the one thing a single-channel image carries, and make a constant image undefined.
- Transparency (``RGBA``, ``LA``, ``PA``, palettes and greys with a transparent colour) is composited
  on :data:`BACKGROUND`, white, as viewers show it; alpha never leaks in as pixel values.
- EXIF orientation is applied (``ImageOps.exif_transpose``), as every viewer and phone does.
- Multi-frame files (GIF, TIFF, WebP, MPO) give their first frame.

Only :data:`IMAGE_FORMATS` are decoded, everywhere, and the size is checked from the header before any
pixel is decoded (``max_pixels``, ``max_side``), so a decompression bomb costs a header read. Pillow's
own bomb guard (``Image.MAX_IMAGE_PIXELS``, left at its default) is reported the same way. Pure
Pillow/numpy: this module touches no store.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from strata.models.errors import UserError

# Pillow format names; "MPO" is the multi-picture JPEG many cameras and phones write.
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "GIF", "WEBP", "TIFF")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
BACKGROUND = (255, 255, 255)
# Names these decoding rules; part of every feature-cache key, so that features embedded from other pixels
# (an older decoder's) are never reused. Change it whenever a rule above changes what an image decodes to.
DECODER = "strata-images-1"
MAX_PIXELS = 40_000_000
_WIDE_UNSIGNED = {"I;16", "I;16B", "I;16L", "I;16N"}


class ImageError(UserError, ValueError):
    """An image is refused; the message says why, the caller names the file."""


class ImageFormatError(ImageError):
    """The file is an image in a format outside :data:`IMAGE_FORMATS`."""


class ImageTooLargeError(ImageError):
    """The header claims more pixels than the budget allows; nothing was decoded."""


class ImageUnreadableError(ImageError):
    """The bytes do not decode as an image; ``detail`` says what Pillow found."""

    def __init__(self, detail: str):
        self.detail = detail
        super().__init__(f"does not decode as an image ({detail})")


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def accepted_formats() -> str:
    return ", ".join(IMAGE_FORMATS)


def read_header(source: bytes | str | Path) -> ImageHeader:
    """Format and size from the header alone (no pixel decoded); refuses formats outside the list."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            header = ImageHeader(str(image.format), image.width, image.height)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"does not decode as an image (DecompressionBombError: {exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageUnreadableError("not a file in any image format") from exc
    except Exception as exc:  # Pillow raises many types for data that is not an image; each is a refusal
        raise ImageUnreadableError(f"{type(exc).__name__}: {exc}") from exc
    if header.format not in IMAGE_FORMATS:
        raise ImageFormatError(f"format {header.format} is not accepted (accepted: {accepted_formats()})")
    return header


def check_size(header: ImageHeader, max_pixels: int = MAX_PIXELS, max_side: int | None = None) -> None:
    if header.pixels > max_pixels or (max_side is not None and max(header.width, header.height) > max_side):
        side = f" and {max_side} per side" if max_side is not None else ""
        raise ImageTooLargeError(
            f"{header.width}x{header.height} pixels is over the size limit (possible decompression bomb): "
            f"the limit is {max_pixels} pixels{side}"
        )


def inspect(source: bytes | str | Path, max_pixels: int = MAX_PIXELS, max_side: int | None = None) -> ImageHeader:
    """Everything :func:`decode` checks short of decoding: format, claimed size, and Pillow's integrity check
    (``Image.verify``: PNG checksums, truncation), so a damaged file is refused rather than read as noise."""
    header = read_header(source)
    check_size(header, max_pixels, max_side)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.verify()
    except Exception as exc:  # corrupt or truncated data: Pillow raises many types, each is a refusal
        raise ImageUnreadableError(f"{type(exc).__name__}: {exc}") from exc
    return header


def decode(source: bytes | str | Path, max_pixels: int = MAX_PIXELS, max_side: int | None = None) -> Image.Image:
    """The file (its bytes or its path) as an upright 8-bit RGB image; see the module docstring for the rules.

    Raises ImageFormatError, ImageTooLargeError (before decoding anything) or ImageUnreadableError.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    inspect(data, max_pixels, max_side)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            value_range = _integer_range(image)  # read before transposing: a transposed copy has no TIFF tags
            return to_rgb(ImageOps.exif_transpose(image), value_range)
    except Exception as exc:  # corrupt or truncated data: Pillow raises many types, each is a refusal
        raise ImageUnreadableError(f"{type(exc).__name__}: {exc}") from exc


def to_rgb(image: Image.Image, value_range: tuple[int, int] | None = None) -> Image.Image:
    """``image`` (any Pillow mode) as 8-bit RGB by its real range; ``value_range`` overrides the integer range."""
    if image.mode in _WIDE_UNSIGNED or image.mode in {"I", "F"}:
        return Image.fromarray(_scaled(image, value_range or _integer_range(image)), "L").convert("RGB")
    if image.has_transparency_data:
        background = Image.new("RGBA", image.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _integer_range(image: Image.Image) -> tuple[int, int] | None:
    """(bits, signed) of a wide integer image's stored samples; None for any other mode."""
    if image.mode in _WIDE_UNSIGNED:
        return 16, 0
    if image.mode != "I":
        return None
    tags = getattr(image, "tag_v2", None)
    if tags is None:
        return 32, 1  # Pillow's mode I is int32
    return int(tags.get(258, (32,))[0]), int(tags.get(339, (1,))[0] == 2)


def _scaled(image: Image.Image, value_range: tuple[int, int] | None) -> np.ndarray:
    values = np.asarray(image)
    if value_range is None:  # mode F
        unit = np.nan_to_num(values.astype(np.float64), nan=0.0)
    else:
        bits, signed = value_range
        if values.dtype == np.int32 and not signed:
            values = values.view(np.uint32)  # unsigned 32-bit samples that Pillow keeps in an int32
        unit = values.astype(np.float64) / (2 ** (bits - signed) - 1)
    return np.round(np.clip(unit, 0.0, 1.0) * 255).astype(np.uint8)
