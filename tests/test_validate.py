"""The data stage checks every annotation line and image once, reports every problem with file and line, and
publishes nothing under the `error` policy; under `skip` it leaves the bad samples out and lists them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from image_files import write_16_bit, write_bomb_png, write_rotated_jpeg, write_transparent, write_truncated
from PIL import Image
from tiny_project import TinyProject

from internvl_sft.paths import staging_dir

TRAIN = "annotations/ui_dataset_train.jsonl"
VAL = "annotations/ui_dataset_val.jsonl"


def qa(question: str = "<image>\n点击微信", answer: str = "操作：点击\n参数：[500, 500]") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def line(image, conversations=None) -> str:
    return json.dumps({"image": image, "conversations": conversations or qa()}, ensure_ascii=False)


# (annotation line, expected reason or None for a good sample); the line number is the position + 1.
TRAIN_LINES: list[tuple[str | bytes, str | None]] = [
    (line("images/ok.png"), None),
    ('{"image": "images/ok.png", "conversations": [', "invalid JSON: Expecting value (column 46)"),
    (json.dumps({"image": "images/ok.png"}), "missing 'conversations'"),
    (line(3), "'image' must be a path or a list of non-empty paths"),
    (line("images/ok.png", qa()[::-1]),
     "conversation turn 1 has role 'gpt', expected 'human' (roles alternate human/gpt from human; "
     "a leading system is allowed)"),
    (line("images/ok.png", qa(answer=" ")), "conversation turn 2 is an empty gpt answer"),
    (line("images/ok.png", qa("<image><image>两张")), "conversation has 2 <image> placeholder(s) but 1 image(s)"),
    (line("../outside.png"), "image path '../outside.png' escapes the dataset root"),
    (line("images/missing.png"), "image file {dataset}/images/missing.png not found"),
    (line("images/empty.png"), "image {dataset}/images/empty.png: empty file (0 bytes)"),
    (line("images/cut.png"), "image {dataset}/images/cut.png: cannot be decoded, the file is truncated or corrupt "
                             "(image file is truncated)"),
    (line("images/text.png"), "image {dataset}/images/text.png: not an image file (format not recognised)"),
    (line("images/dot.png"), "image {dataset}/images/dot.png: 1x1 pixels is too small (min_image_side 10)"),
    (line("images/bomb.png"), "image {dataset}/images/bomb.png: too large, possible decompression bomb"),
    ('{"image": "images/ok.png", "conversations": "caf\xe9"}'.encode("latin-1"),
     "not valid UTF-8 (byte 0xe9 at column 49)"),
    (json.dumps({"image": "images/ok.png", "conversations": qa(answer="\ud800")}),  # escaped as \\ud800
     "conversation turn 2 holds a lone surrogate escape (not valid Unicode text)"),
    (line("images/rgba.png"), None),
    (line("images/palette.png"), None),
    (line("images/grey.png"), None),
    (line("images/cmyk.jpg"), None),
    (line("images/deep.png"), None),
    (line("images/rotated.jpg"), None),
]
CONVERTED = {
    "images/rgba.png": ["mode RGBA with transparency: flattened onto white, converted to RGB"],
    "images/palette.png": ["mode P with transparency: flattened onto white, converted to RGB"],
    "images/grey.png": ["mode L converted to RGB"],
    "images/cmyk.jpg": ["mode CMYK converted to RGB"],
    "images/deep.png": ["16-bit mode I;16: scaled to 8 bits, converted to RGB"],
    "images/rotated.jpg": ["EXIF orientation 6 applied"],
}


def write_images(images: Path) -> None:
    images.mkdir(parents=True)
    Image.new("RGB", (40, 80), (30, 30, 200)).save(images / "ok.png")
    (images / "empty.png").write_bytes(b"")
    write_truncated(images / "cut.png")
    (images / "text.png").write_text("<html>not found</html>")
    Image.new("RGB", (1, 1)).save(images / "dot.png")
    write_bomb_png(images / "bomb.png")
    write_transparent(images / "rgba.png", "RGBA", (40, 80))
    write_transparent(images / "palette.png", "P", (40, 80))
    Image.new("L", (40, 80)).save(images / "grey.png")
    Image.new("CMYK", (40, 80)).save(images / "cmyk.jpg")
    write_16_bit(images / "deep.png", 1000, (40, 80))
    write_rotated_jpeg(images / "rotated.jpg", (80, 40))


def write_annotation(path: Path, lines: list[str | bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join((text if isinstance(text, bytes) else text.encode()) + b"\n" for text in lines))


@pytest.fixture
def source(tmp_path) -> Path:
    """A dataset folder as a user would point `data.local_path` at: images and annotation files."""
    folder = tmp_path / "source"
    write_images(folder / "images")
    write_annotation(folder / TRAIN, [text for text, _ in TRAIN_LINES])
    write_annotation(folder / VAL, [line("images/ok.png"), line("images/gone.png")])
    return folder


def project_for(tmp_path: Path, source: Path, policy: str) -> TinyProject:
    project = TinyProject(tmp_path / "project")
    project.write_params({"data": {"source": "local", "local_path": str(source),
                                   "validation": {"on_bad_sample": policy}}})
    return project


def expected_problems(dataset: Path) -> list[str]:
    problems = [f"{dataset}/{TRAIN}:{number}: {reason.format(dataset=dataset)}"
                for number, (_, reason) in enumerate(TRAIN_LINES, start=1) if reason]
    return problems + [f"{dataset}/{VAL}:2: image file {dataset}/images/gone.png not found"]


def assert_matches(listed: list[str], expected: list[str]) -> None:
    """Same problems in the same order; a listed one may add detail after the expected text."""
    assert len(listed) == len(expected), "\n".join(listed)
    for got, want in zip(listed, expected):
        assert got.startswith(want), f"{got!r} does not start with {want!r}"


def test_error_policy_lists_every_problem_and_publishes_nothing(tmp_path, source, capsys):
    project = project_for(tmp_path, source, "error")
    with pytest.raises(SystemExit) as caught:
        project.run_data()
    message = str(caught.value.code)
    header, *listed = message.splitlines()
    expected = expected_problems(project.dataset)
    assert header.startswith(f"data: {len(expected)} problem(s) found; nothing was published to {project.dataset}")
    assert_matches([text.strip() for text in listed], expected)
    assert not project.dataset.exists() and not staging_dir(project.dataset).exists()
    assert not project.report.exists()


def test_error_policy_keeps_the_previous_dataset(tmp_path, source):
    project = project_for(tmp_path, source, "skip")
    project.run_data()
    before = (project.dataset / TRAIN).read_bytes()
    project.write_params({"data": {"source": "local", "local_path": str(source), "synthetic": {"seed": 1},
                                   "validation": {"on_bad_sample": "error"}}})
    with pytest.raises(SystemExit):
        project.run_data()
    assert (project.dataset / TRAIN).read_bytes() == before
    assert not staging_dir(project.dataset).exists()


def test_skip_policy_leaves_bad_samples_out_and_reports_them(tmp_path, source, capsys):
    project = project_for(tmp_path, source, "skip")
    project.run_data()
    expected = expected_problems(project.dataset)
    report = json.loads(project.report.read_text())
    assert report["policy"] == "skip"
    assert report["samples_checked"] == len(TRAIN_LINES) + 2
    assert report["samples_skipped"] == len(expected)
    assert_matches(report["skipped"], expected)
    assert report["images_converted"] == {f"{project.dataset}/{name}": notes for name, notes in CONVERTED.items()}
    good = [text for text, reason in TRAIN_LINES if reason is None]
    assert (project.dataset / TRAIN).read_text().splitlines() == good
    meta = json.loads((project.dataset / "meta/ui_dataset.json").read_text())
    assert meta["ui-dataset"]["length"] == len(good)
    assert f"{len(expected)} bad sample(s) skipped" in capsys.readouterr().out


def test_skip_policy_refuses_a_split_left_empty(tmp_path, source):
    write_annotation(source / VAL, [line("images/gone.png")])
    project = project_for(tmp_path, source, "skip")
    with pytest.raises(SystemExit, match=rf"{project.dataset}/{VAL}: no usable sample"):
        project.run_data()
    assert not project.dataset.exists()


def test_annotation_file_without_samples_is_refused(tmp_path, source):
    (source / VAL).write_text("\n")
    project = project_for(tmp_path, source, "error")
    with pytest.raises(SystemExit, match=rf"{project.dataset}/{VAL}: no usable sample"):
        project.run_data()
    assert not project.dataset.exists()
