"""Image bytes -> pixels, bounded: the one place an attached picture is decoded.

chat/attachments.py checks a picture with `probe` before it joins a message; vision backends
read it with `decode`. The pixel count is checked from the file's header before any pixel is
decoded (a small file can claim a huge picture), and only common formats are opened. Knows
Pillow (imported lazily), not engines or callers.
"""

from __future__ import annotations

import io
from typing import Any

from .base import ImageData, ParamError

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp"}
WHICH = "PNG, JPEG, WebP, GIF or BMP"
MAX_PIXELS = 64_000_000  # the backends' own ceiling, whatever the server's limit says


class ImageError(ParamError):
    """A picture that cannot be used; the message names it and says what works."""


def _open(data: bytes, name: str, max_pixels: int) -> Any:
    """The picture, decoded (first frame), after its header's size was checked."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:  # pragma: no cover - Pillow comes with gradio and transformers
        raise ImageError("Reading images needs Pillow: pip install pillow") from e
    try:
        picture = Image.open(io.BytesIO(data), formats=list(FORMATS))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"{name} is not a picture Confab can read; send a {WHICH} file.") from e
    except Image.DecompressionBombError as e:  # Pillow's own ceiling, far above ours
        raise _too_big(f"{name} is over {_pixels(2 * Image.MAX_IMAGE_PIXELS)}", max_pixels) from e
    width, height = picture.size
    if width * height > max_pixels:
        raise _too_big(f"{name} is {width:,} x {height:,} ({_pixels(width * height)})", max_pixels)
    try:
        picture.load()
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise ImageError(f"{name} is damaged or cut short ({e}); send another copy.") from e
    return picture


def _too_big(what: str, max_pixels: int) -> ImageError:
    return ImageError(f"{what}; this server takes at most {_pixels(max_pixels)} (--max-image-pixels). "
                      "Send a smaller picture.")


def _pixels(n: int) -> str:
    return f"{n / 1e6:.1f} million pixels" if n >= 1_000_000 else f"{n:,} pixels"


def probe(data: bytes, name: str = "the image", max_pixels: int = MAX_PIXELS) -> tuple[str, int, int]:
    """(mime type, width, height) of a picture that decodes, else an ImageError that says why."""
    picture = _open(data, name, min(max_pixels, MAX_PIXELS))
    return FORMATS[picture.format], picture.width, picture.height


def decode(image: ImageData) -> Any:
    """An RGB PIL image, turned upright as the camera meant (EXIF), transparency on white."""
    from PIL import Image, ImageOps

    picture = _open(image.data, image.name or "the image", MAX_PIXELS)
    picture = ImageOps.exif_transpose(picture)
    if picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and "transparency" in picture.info):
        rgba = picture.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return picture.convert("RGB")
