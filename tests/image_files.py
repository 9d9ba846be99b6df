"""Image files, good and bad, written the way a real dataset might hold them."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_bomb_png(path: Path, side: int = 100_000) -> Path:
    """A PNG whose header claims side x side pixels: a few bytes on disk, gigabytes once decoded."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b""))
    return path


def write_truncated(path: Path, size: tuple[int, int] = (64, 64)) -> Path:
    """A noisy image cut in half, as an interrupted copy leaves it."""
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_16_bit(path: Path, value: int, size: tuple[int, int] = (16, 16)) -> Path:
    Image.fromarray(np.full((size[1], size[0]), value, dtype=np.uint16)).save(path)
    return path


def write_rotated_jpeg(path: Path, size: tuple[int, int], orientation: int = 6) -> Path:
    image = Image.new("RGB", size, (200, 30, 30))
    exif = image.getexif()
    exif[EXIF_ORIENTATION] = orientation
    image.save(path, exif=exif)
    return path


def write_transparent(path: Path, mode: str = "RGBA", size: tuple[int, int] = (16, 16)) -> Path:
    """Fully transparent pixels whose hidden colour is black."""
    if mode == "P":
        image = Image.new("P", size, 0)
        image.putpalette([0, 0, 0] * 256)
        image.save(path, transparency=0)
    else:
        Image.new(mode, size, (0,) * len(mode)).save(path)
    return path
