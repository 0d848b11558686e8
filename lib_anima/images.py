"""Images from clients (base64 text or bytes): decoded with a clear error for every way they can be wrong.

Wrong base64, not an image, a truncated file, a decompression bomb (a small file that claims billions of
pixels) and over-large dimensions each raise :class:`ArgumentError` naming the image, before any pixel
buffer is allocated for the oversized cases.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, UnidentifiedImageError

from lib_anima.errors import ArgumentError

MAX_PIXELS = 8192 * 8192
FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


def decode_base64(data: object, what: str = "the image") -> bytes:
    """Bytes of a base64 string, optionally a ``data:...;base64,`` URL; strict (no silently dropped characters)."""
    if not isinstance(data, str):
        raise ArgumentError(f"{what} must be a base64 string, got {type(data).__name__}")
    text = _DATA_URL.sub("", data.strip(), count=1)
    text = _WHITESPACE.sub("", text)
    if not text:
        raise ArgumentError(f"{what} is empty")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ArgumentError(f"{what} is not valid base64") from None


def image_size(raw: bytes, what: str = "the image", max_pixels: int = MAX_PIXELS,
               formats: tuple[str, ...] | None = FORMATS) -> tuple[int, int, str]:
    """(width, height, format) from the header only; refuses non-images and sizes over `max_pixels`.
    `formats`: the accepted formats (None: any that Pillow reads, as the host's own image decoding)."""
    with _opened(raw, what, max_pixels, formats) as image:
        return image.width, image.height, str(image.format)


def open_image(raw: bytes, what: str = "the image", max_pixels: int = MAX_PIXELS,
               formats: tuple[str, ...] | None = FORMATS) -> Image.Image:
    """The decoded image (fully read, so a truncated file fails here rather than later)."""
    with _opened(raw, what, max_pixels, formats) as image:
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise ArgumentError(f"{what} is truncated or corrupt ({e})") from None
        return image.copy()


class _opened:
    """Image.open with the bomb check turned into an error and the size checked against `max_pixels`."""

    def __init__(self, raw: bytes, what: str, max_pixels: int, formats: tuple[str, ...] | None):
        self.raw, self.what, self.max_pixels, self.formats = raw, what, max_pixels, formats
        self.image: Image.Image | None = None

    def __enter__(self) -> Image.Image:
        if not self.raw:
            raise ArgumentError(f"{self.what} is empty (0 bytes)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                self.image = Image.open(io.BytesIO(self.raw))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ArgumentError(f"{self.what} claims more pixels than any image here may have "
                                f"(at most {self.max_pixels})") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise ArgumentError(f"{self.what} is not an image this server reads") from None
        image = self.image
        if self.formats is not None and image.format not in self.formats:
            raise ArgumentError(f"{self.what} is {image.format}; {', '.join(self.formats)} expected")
        if image.width < 1 or image.height < 1 or image.width * image.height > self.max_pixels:
            raise ArgumentError(f"{self.what} is {image.width}x{image.height}; at most {self.max_pixels} pixels")
        return image

    def __exit__(self, *exc: object) -> None:
        if self.image is not None:
            self.image.close()
