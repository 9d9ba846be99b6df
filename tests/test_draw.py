"""Marks land where the normalised coordinates say, in the colour of their source."""

import pytest
from PIL import Image

from internvl_sft.draw import GROUND_TRUTH, PREDICTION, annotate, fit
from internvl_sft.metrics import CLICK, SWIPE, TYPE, Action

GREY = (128, 128, 128)


@pytest.fixture
def screen() -> Image.Image:
    return Image.new("RGB", (200, 400), GREY)


def close_to(pixel: tuple[int, int, int], colour: tuple[int, int, int], tolerance: int = 30) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour))


def test_click_is_a_ring_around_its_point_in_the_prediction_colour(screen):
    out = annotate(screen, [(Action(CLICK, ((500, 500),)), PREDICTION)])
    centre = (100, 200)
    assert close_to(out.getpixel(centre), PREDICTION.colour)
    ring = [out.getpixel((100 + dx, 200)) for dx in range(4, 20)]
    assert any(close_to(p, PREDICTION.colour) for p in ring)
    assert out.getpixel((10, 10)) == GREY and out.getpixel((100, 300)) == GREY


def test_swipe_is_an_arrow_from_start_to_end(screen):
    out = annotate(screen, [(Action(SWIPE, ((100, 500), (900, 500))), GROUND_TRUTH)])
    assert close_to(out.getpixel((100, 200)), GROUND_TRUTH.colour)
    assert close_to(out.getpixel((176, 200)), GROUND_TRUTH.colour)  # inside the head, just before the tip
    assert out.getpixel((100, 150)) == GREY


def test_box_outline_and_light_fill(screen):
    out = annotate(screen, [((250, 250, 750, 750), GROUND_TRUTH)])
    assert close_to(out.getpixel((50, 200)), GROUND_TRUTH.colour)
    inside = out.getpixel((100, 200))
    assert inside != GREY and not close_to(inside, GROUND_TRUTH.colour)
    assert out.getpixel((20, 200)) == GREY


def test_typed_text_becomes_captions_at_the_bottom_one_per_source(screen):
    out = annotate(screen, [(Action(TYPE, text="耳机"), GROUND_TRUTH), (Action(TYPE, text="电影"), PREDICTION)])
    bottom = [out.getpixel((8, y)) for y in range(300, 400)]
    assert any(close_to(p, GROUND_TRUTH.colour) for p in bottom)
    assert any(close_to(p, PREDICTION.colour) for p in bottom)
    first_gt = next(y for y in range(300, 400) if close_to(out.getpixel((8, y)), GROUND_TRUTH.colour))
    first_pred = next(y for y in range(300, 400) if close_to(out.getpixel((8, y)), PREDICTION.colour))
    assert first_gt < first_pred
    assert out.getpixel((100, 100)) == GREY


def test_fit_scales_the_longer_side_up_or_down(screen):
    assert fit(screen, 100).size == (50, 100)
    assert fit(screen, 800).size == (400, 800)
    assert annotate(screen, [], max_side=100).size == (50, 100)
    assert annotate(screen, []).tobytes() == screen.tobytes()
