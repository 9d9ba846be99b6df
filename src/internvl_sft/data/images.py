"""Reading image files that may be bad: every way one can fail becomes an `ImageProblem` naming file and reason.

The model sees every image as RGB with its EXIF orientation applied. Other modes are converted (transparency
is flattened onto white, 16-bit values are scaled to 8 bits); `conversion_notes` says what was done, and the
data stage lists those notes in its report: they are not errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_ORIENTATION = 0x0112
# EXIF orientations that turn the image by 90 degrees, swapping width and height.
TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
WHITE = (255, 255, 255, 255)


class ImageProblem(ValueError):
    """An image file that cannot be used."""

    def __init__(self, path: Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"image {path}: {reason}")


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """Sizes accepted: a shorter side is a useless image, more pixels a possible decompression bomb."""

    min_side: int = 10
    max_pixels: int = Image.MAX_IMAGE_PIXELS


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn whatever Pillow raises on a bad file into an ImageProblem for `path`."""
    try:
        yield
    except ImageProblem:
        raise
    except FileNotFoundError:
        raise ImageProblem(path, "file not found") from None
    except IsADirectoryError:
        raise ImageProblem(path, "is a directory, not an image file") from None
    except UnidentifiedImageError:
        raise ImageProblem(path, "not an image file (format not recognised)") from None
    except Image.DecompressionBombError as err:
        raise ImageProblem(path, f"too large, possible decompression bomb ({err})") from None
    except Exception as err:  # noqa: BLE001 - a broken file makes Pillow raise many kinds of errors
        raise ImageProblem(path, f"cannot be decoded, the file is truncated or corrupt ({err})") from None


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ALPHA_MODES or (image.mode in ("P", "L") and "transparency" in image.info)


def is_16_bit(image: Image.Image) -> bool:
    return image.mode.startswith("I;16")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of an image of any mode; transparent areas become white, 16-bit values are scaled down."""
    if image.mode == "RGB":
        return image
    if has_alpha(image):
        background = Image.new("RGBA", image.size, WHITE)
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    if is_16_bit(image):
        high_bytes = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(high_bytes, "L").convert("RGB")
    return image.convert("RGB")


def conversion_notes(image: Image.Image) -> list[str]:
    """What `load_image` changes in this image besides decoding it."""
    notes = []
    orientation = image.getexif().get(EXIF_ORIENTATION)
    if orientation not in (None, 1):
        notes.append(f"EXIF orientation {orientation} applied")
    if has_alpha(image):
        notes.append(f"mode {image.mode} with transparency: flattened onto white, converted to RGB")
    elif is_16_bit(image):
        notes.append(f"16-bit mode {image.mode}: scaled to 8 bits, converted to RGB")
    elif image.mode != "RGB":
        notes.append(f"mode {image.mode} converted to RGB")
    return notes


def load_image(path: Path) -> Image.Image:
    """Open an image as RGB with its EXIF orientation applied (phone screenshots are often rotated)."""
    with reading(path), Image.open(path) as image:
        return to_rgb(ImageOps.exif_transpose(image))


def oriented_size(path: Path) -> tuple[int, int]:
    """(width, height) as `load_image` will return it, read from the file header only."""
    with reading(path), Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(EXIF_ORIENTATION) in TRANSPOSING_ORIENTATIONS:
            return height, width
        return width, height


def check_size(path: Path, width: int, height: int, limits: ImageLimits) -> None:
    if min(width, height) < limits.min_side:
        raise ImageProblem(path, f"{width}x{height} pixels is too small (min_image_side {limits.min_side})")
    if width * height > limits.max_pixels:
        raise ImageProblem(
            path, f"{width}x{height} = {width * height} pixels exceeds max_image_pixels {limits.max_pixels} "
            "(decompression-bomb limit)"
        )


def check_image(path: Path, limits: ImageLimits) -> list[str]:
    """Decode the whole file once; its conversion notes, or an ImageProblem saying why it cannot be used.

    The size is checked from the header, before any pixel is decoded.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise ImageProblem(path, "empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with reading(path), Image.open(path) as image:
            check_size(path, *image.size, limits)
            image.load()
            return conversion_notes(image)
