"""Dynamic-resolution tiling as InternVL2 does it: grid choice, tiles, thumbnail, normalisation.

An image is resized to a grid of `cols x rows` square tiles whose aspect ratio is closest to the image's,
cut row-major into tiles, and followed by a thumbnail of the whole image when there is more than one tile.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All (cols, rows) with min_num <= cols * rows <= max_num, fewest tiles first."""
    if min_num < 1 or max_num < min_num:
        raise ValueError(f"tile limits need 1 <= min_num <= max_num, got min_num={min_num}, max_num={max_num}")
    grids = [(cols, rows) for cols in range(1, max_num + 1) for rows in range(1, max_num + 1)]
    return sorted(
        ((cols, rows) for cols, rows in grids if min_num <= cols * rows <= max_num),
        key=lambda grid: (grid[0] * grid[1], grid[0]),
    )


def choose_grid(width: int, height: int, *, min_num: int, max_num: int, tile_size: int) -> tuple[int, int]:
    """The (cols, rows) grid whose aspect ratio is closest to width / height.

    Candidates are visited from the fewest tiles up; on an exact tie in aspect-ratio distance the later
    (larger) grid wins only when the image has more than half the pixels of that grid at full resolution,
    so small images are not blown up.
    """
    aspect_ratio = width / height
    best, best_distance = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_num, max_num):
        distance = abs(aspect_ratio - cols / rows)
        if distance < best_distance:
            best, best_distance = (cols, rows), distance
        elif distance == best_distance and width * height > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def tile_count(
    width: int, height: int, *, tile_size: int, min_num: int, max_num: int, use_thumbnail: bool
) -> int:
    """How many tiles `dynamic_tiles` makes for an image of this size, without touching pixels."""
    cols, rows = choose_grid(width, height, min_num=min_num, max_num=max_num, tile_size=tile_size)
    tiles = cols * rows
    return tiles + 1 if use_thumbnail and tiles > 1 else tiles


def dynamic_tiles(
    image: Image.Image, *, tile_size: int, min_num: int, max_num: int, use_thumbnail: bool
) -> list[Image.Image]:
    """Cut `image` into grid tiles (row-major), plus a thumbnail when use_thumbnail and more than one tile."""
    cols, rows = choose_grid(image.width, image.height, min_num=min_num, max_num=max_num, tile_size=tile_size)
    resized = image.resize((tile_size * cols, tile_size * rows), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((col * tile_size, row * tile_size, (col + 1) * tile_size, (row + 1) * tile_size))
        for row in range(rows)
        for col in range(cols)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
    return tiles


def to_pixel_values(tiles: list[Image.Image], tile_size: int) -> torch.Tensor:
    """Stack tiles into a float32 (N, 3, S, S) tensor: RGB, bicubic resize to S, /255, ImageNet mean/std."""
    if not tiles:
        raise ValueError("to_pixel_values needs at least one tile")
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return torch.stack([(tile_tensor(tile, tile_size) - mean) / std for tile in tiles])


def tile_tensor(tile: Image.Image, tile_size: int) -> torch.Tensor:
    """One tile as (3, S, S) float32 in [0, 1]."""
    rgb = tile if tile.mode == "RGB" else tile.convert("RGB")
    if rgb.size != (tile_size, tile_size):
        rgb = rgb.resize((tile_size, tile_size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).to(torch.float32).div(255)


def jpeg_degrade(image: Image.Image, quality: int) -> Image.Image:
    """Re-encode as JPEG at `quality`: the data augmentation upstream applies when a dataset sets data_augment."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as degraded:
        return degraded.convert("RGB")
