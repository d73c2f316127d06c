"""Decode a user's image: a `data:` URL (base64), raw bytes, bare base64 text, or a local file path.

Every failure is an ImageError (a ValueError) whose message names the problem, so a server can answer 400 with it.
The size is checked from the header, before the pixels are decoded, so an oversized image costs no memory.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import warnings

import PIL.Image
import PIL.ImageOps

DEFAULT_MAX_PIXELS = 8192 * 8192  # far above what Qwen-VL processors keep (12.8 MP), well below a decompression bomb


class ImageError(ValueError):
    """The input is not a usable image."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than allowed."""


def load_image(source: str | bytes | PIL.Image.Image, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               allow_local_files: bool = True) -> PIL.Image.Image:
    """A decoded PIL image (EXIF orientation applied, mode kept) from a data: URL, bytes, base64 text or a path."""
    if isinstance(source, PIL.Image.Image):
        _check_size(source.width, source.height, max_pixels)
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image(bytes(source), max_pixels=max_pixels)
    if not isinstance(source, str):
        raise ImageError(f"an image must be a data: URL, a file path, base64 text or bytes; got {type(source).__name__}")
    if source.startswith("data:"):
        return decode_image(_data_url_bytes(source), max_pixels=max_pixels)
    if source.startswith(("http://", "https://")):
        raise ImageError(f"remote image URLs are not fetched ({source[:80]!r}); send the image as a data: URL")
    path = source.removeprefix("file://")
    if len(path) < 4096 and os.path.isfile(path):  # a long string is base64 text: no need to ask the filesystem
        if not allow_local_files:
            raise ImageError("local image paths are not allowed here; send the image as a data: URL")
        with open(path, "rb") as f:
            return decode_image(f.read(), max_pixels=max_pixels)
    try:
        data = base64.b64decode(source, validate=True)
    except (binascii.Error, ValueError):
        shown = source if len(source) <= 80 else source[:77] + "..."
        raise ImageError(f"image {shown!r} is not a data: URL, an existing file, or base64 data") from None
    return decode_image(data, max_pixels=max_pixels)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> PIL.Image.Image:
    """Decode image file bytes (any format pillow reads), refusing more than `max_pixels` pixels."""
    if not data:
        raise ImageError("image data is empty")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns, then raises, on its fixed limit; ours is the limit that counts.
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(io.BytesIO(data))
            _check_size(image.width, image.height, max_pixels)
            image.load()
            return PIL.ImageOps.exif_transpose(image)
    except ImageError:
        raise
    except PIL.Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"image is too large to decode: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # UnidentifiedImageError (an OSError): not an image at all; the others: a truncated or corrupt file.
        raise ImageError(f"cannot decode the image ({len(data)} bytes): {e}") from None


def _data_url_bytes(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise ImageError("data: URL has no ',' before its data")
    if not header.endswith(";base64"):
        raise ImageError(f"data: URL {header!r} is not base64-encoded; use data:image/png;base64,...")
    media_type = header[len("data:"):-len(";base64")]
    if media_type and not media_type.startswith("image/"):
        raise ImageError(f"data: URL has media type {media_type!r}; expected image/*")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)  # line breaks are common in pasted data
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"data: URL has invalid base64 data: {e}") from None


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLargeError(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} "
                                 "(resize it, or raise the server's image pixel limit)")
    if width <= 0 or height <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
