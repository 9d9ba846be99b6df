"""Image files that may be bad: each failure is an ImageProblem naming the file; odd modes become RGB with a note."""

from pathlib import Path

import pytest
from image_files import write_16_bit, write_bomb_png, write_rotated_jpeg, write_transparent, write_truncated
from PIL import Image

from internvl_sft.data.images import ImageLimits, ImageProblem, check_image, load_image, oriented_size

LIMITS = ImageLimits(min_side=4, max_pixels=10_000)
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def problem_of(path: Path, limits: ImageLimits = LIMITS) -> str:
    with pytest.raises(ImageProblem) as caught:
        check_image(path, limits)
    assert caught.value.path == path
    assert str(caught.value).startswith(f"image {path}: ")
    return caught.value.reason


def test_plain_rgb_image_has_no_notes(tmp_path):
    path = tmp_path / "ok.png"
    Image.new("RGB", (20, 10)).save(path)
    assert check_image(path, LIMITS) == []


def test_missing_empty_and_non_image_files(tmp_path):
    assert problem_of(tmp_path / "missing.png") == "file not found"
    (tmp_path / "empty.png").write_bytes(b"")
    assert problem_of(tmp_path / "empty.png") == "empty file (0 bytes)"
    (tmp_path / "text.png").write_text("not an image")
    assert problem_of(tmp_path / "text.png") == "not an image file (format not recognised)"
    (tmp_path / "folder.png").mkdir()
    assert problem_of(tmp_path / "folder.png") == "is a directory, not an image file"


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file_is_found_by_decoding_it(tmp_path, suffix):
    path = write_truncated(tmp_path / f"cut{suffix}")
    assert problem_of(path).startswith("cannot be decoded, the file is truncated or corrupt")


def test_tiny_and_huge_images(tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    assert problem_of(tmp_path / "dot.png") == "1x1 pixels is too small (min_image_side 4)"
    Image.new("RGB", (200, 60)).save(tmp_path / "big.png")
    assert problem_of(tmp_path / "big.png") == (
        "200x60 = 12000 pixels exceeds max_image_pixels 10000 (decompression-bomb limit)"
    )


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    path = write_bomb_png(tmp_path / "bomb.png")
    assert path.stat().st_size < 100
    assert problem_of(path, ImageLimits()).startswith("too large, possible decompression bomb")
    with pytest.raises(ImageProblem, match="decompression bomb"):
        load_image(path)


@pytest.mark.parametrize(
    ("mode", "note"),
    [
        ("RGBA", "mode RGBA with transparency: flattened onto white, converted to RGB"),
        ("LA", "mode LA with transparency: flattened onto white, converted to RGB"),
        ("P", "mode P with transparency: flattened onto white, converted to RGB"),
    ],
)
def test_transparent_pixels_become_white(tmp_path, mode, note):
    path = write_transparent(tmp_path / f"{mode}.png", mode)
    assert check_image(path, LIMITS) == [note]
    image = load_image(path)
    assert image.mode == "RGB" and image.getpixel((3, 3)) == WHITE


def test_16_bit_values_are_scaled_to_8_bits(tmp_path):
    path = write_16_bit(tmp_path / "deep.png", value=0x8000)
    assert check_image(path, LIMITS) == ["16-bit mode I;16: scaled to 8 bits, converted to RGB"]
    assert load_image(path).getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize(("mode", "suffix"), [("L", ".png"), ("CMYK", ".jpg"), ("1", ".png")])
def test_other_modes_are_converted_with_a_note(tmp_path, mode, suffix):
    path = tmp_path / f"image{suffix}"
    Image.new(mode, (16, 8)).save(path)
    assert check_image(path, LIMITS) == [f"mode {mode} converted to RGB"]
    assert load_image(path).mode == "RGB"


def test_exif_rotation_is_applied_and_noted(tmp_path):
    path = write_rotated_jpeg(tmp_path / "rotated.jpg", (40, 20))
    assert check_image(path, LIMITS) == ["EXIF orientation 6 applied"]
    assert load_image(path).size == oriented_size(path) == (20, 40)
    assert load_image(path).mode == "RGB"


def test_plain_image_size_and_mode(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (30, 10), BLACK).save(path)
    assert oriented_size(path) == (30, 10)
    assert load_image(path).getpixel((0, 0)) == BLACK
