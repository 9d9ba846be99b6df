import pytest
import torch
from PIL import Image

from internvl_sft.data.tiling import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    candidate_grids,
    choose_grid,
    dynamic_tiles,
    jpeg_degrade,
    tile_count,
    to_pixel_values,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# Derived by hand from the rule: closest aspect ratio; on an exact tie the larger grid wins when
# width * height > 0.5 * tile^2 * cols * rows.
@pytest.mark.parametrize(
    ("width", "height", "min_num", "max_num", "tile", "grid"),
    [
        (448, 448, 1, 6, 448, (1, 1)),  # (2,2) ties at ratio 1 but 448^2 is not > 2 * 448^2
        (896, 896, 1, 6, 448, (2, 2)),  # tie with (1,1), 4 * 448^2 > 2 * 448^2
        (1000, 1000, 1, 12, 448, (3, 3)),  # 1e6 > 4.5 * 448^2 = 903168, so (3,3) beats (2,2) too
        (800, 800, 1, 12, 448, (2, 2)),  # 640000 > 401408 but not > 903168
        (1080, 2400, 1, 6, 448, (1, 2)),  # ratio 0.45: 1/2 is 0.05 away, 1/3 is 0.117 away
        (1920, 1080, 1, 6, 448, (2, 1)),  # ratio 1.78: 2 is 0.22 away, 3/2 is 0.28 away
        (1920, 1080, 1, 12, 448, (4, 2)),  # (4,2) ties with (2,1), 2073600 > 4 * 448^2
        (560, 448, 1, 6, 448, (1, 1)),  # ratio 1.25: (1,1), (2,2), (3,2) all 0.25 away; image too small
        (2000, 1600, 1, 6, 448, (3, 2)),  # same tie, 3.2e6 > 3 * 448^2 = 602112
        (448, 448, 2, 6, 448, (2, 2)),  # min_num 2 rules out (1,1)
        (4000, 100, 1, 6, 448, (6, 1)),
        (100, 4000, 1, 6, 448, (1, 6)),
        (3000, 500, 1, 1, 448, (1, 1)),
        (100, 100, 1, 4, 28, (2, 2)),  # the tile size enters the tie rule: 10000 > 0.5 * 28^2 * 4
    ],
)
def test_choose_grid(width, height, min_num, max_num, tile, grid):
    assert choose_grid(width, height, min_num=min_num, max_num=max_num, tile_size=tile) == grid


def test_candidate_grids_are_ordered_by_tile_count():
    assert candidate_grids(1, 3) == [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1)]
    assert candidate_grids(4, 4) == [(1, 4), (2, 2), (4, 1)]
    with pytest.raises(ValueError, match="min_num=3, max_num=2"):
        candidate_grids(3, 2)


def quadrants(size: int) -> Image.Image:
    image = Image.new("RGB", (size, size))
    half = size // 2
    for box, colour in zip(
        [(0, 0, half, half), (half, 0, size, half), (0, half, half, size), (half, half, size, size)],
        [RED, GREEN, BLUE, WHITE],
    ):
        image.paste(colour, box)
    return image


def test_tiles_are_cut_row_major_and_followed_by_the_thumbnail():
    tiles = dynamic_tiles(quadrants(64), tile_size=16, min_num=1, max_num=4, use_thumbnail=True)
    assert len(tiles) == 5
    assert all(tile.size == (16, 16) for tile in tiles)
    assert [tile.getpixel((8, 8)) for tile in tiles[:4]] == [RED, GREEN, BLUE, WHITE]
    thumbnail = tiles[4]
    assert [thumbnail.getpixel(xy) for xy in [(2, 2), (13, 2), (2, 13), (13, 13)]] == [RED, GREEN, BLUE, WHITE]


def test_thumbnail_only_with_more_than_one_tile():
    wide = Image.new("RGB", (64, 32), RED)
    assert len(dynamic_tiles(wide, tile_size=16, min_num=1, max_num=6, use_thumbnail=True)) == 3
    assert len(dynamic_tiles(wide, tile_size=16, min_num=1, max_num=6, use_thumbnail=False)) == 2
    single = dynamic_tiles(wide, tile_size=16, min_num=1, max_num=1, use_thumbnail=True)
    assert len(single) == 1 and single[0].size == (16, 16)


@pytest.mark.parametrize("size", [(64, 32), (20, 90), (33, 33), (7, 5), (120, 16)])
@pytest.mark.parametrize("use_thumbnail", [True, False])
def test_tile_count_matches_the_tiles(size, use_thumbnail):
    image = Image.new("RGB", size, GREEN)
    settings = dict(tile_size=16, min_num=1, max_num=6, use_thumbnail=use_thumbnail)
    assert tile_count(*size, **settings) == len(dynamic_tiles(image, **settings))


def test_pixel_values_of_a_solid_colour_are_its_normalised_value():
    colour = (10, 200, 30)
    pixels = to_pixel_values([Image.new("RGB", (20, 30), colour), Image.new("RGB", (8, 8), colour)], 8)
    assert pixels.shape == (2, 3, 8, 8) and pixels.dtype == torch.float32
    for channel in range(3):
        expected = (colour[channel] / 255 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
        assert torch.allclose(pixels[:, channel], torch.full((2, 8, 8), expected), atol=1e-6)


def test_pixel_values_convert_to_rgb():
    pixels = to_pixel_values([Image.new("L", (4, 4), 255)], 4)
    expected = [(1 - mean) / std for mean, std in zip(IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(pixels[0, :, 0, 0], torch.tensor(expected), atol=1e-6)


def test_jpeg_degrade_keeps_size_and_mode():
    degraded = jpeg_degrade(Image.new("L", (16, 8), 100), quality=75)
    assert degraded.size == (16, 8) and degraded.mode == "RGB"
