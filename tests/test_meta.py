import json
from pathlib import Path

import pytest
from PIL import Image

from internvl_sft.data.meta import DataError, DatasetSpec, load_meta, read_samples


def write_json(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(line if isinstance(line, str) else json.dumps(line, ensure_ascii=False) for line in lines)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def spec_for(annotation: Path, root: Path, repeat_time: float = 1.0) -> DatasetSpec:
    return DatasetSpec("ui", root, annotation, repeat_time, data_augment=False, max_dynamic_patch=None, length=None)


def turn(role: str, value: str) -> dict:
    return {"from": role, "value": value}


def qa(question: str = "<image>\n点击", answer: str = "[[1, 2, 3, 4]]") -> list[dict]:
    return [turn("human", question), turn("gpt", answer)]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    images = tmp_path / "data" / "ui" / "images"
    images.mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(images / name)
    return tmp_path / "data" / "ui"


def test_meta_with_several_datasets_resolves_paths_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    meta = write_json(
        tmp_path / "shell" / "data" / "meta.json",
        {
            "ui": {"root": "data/ui", "annotation": "data/ui/train.jsonl", "data_augment": False, "repeat_time": 1,
                   "length": 416},
            "extra": {"root": "/abs/root", "annotation": "data/x.jsonl", "repeat_time": 0.5, "max_dynamic_patch": 2},
        },
    )
    ui, extra = load_meta(meta)
    assert ui == DatasetSpec("ui", tmp_path / "data/ui", tmp_path / "data/ui/train.jsonl", 1.0, False, None, 416)
    assert extra.root == Path("/abs/root") and extra.repeat_time == 0.5 and extra.max_dynamic_patch == 2
    assert extra.data_augment is False and extra.length is None


def test_meta_problems_name_the_file_line_and_dataset_all_at_once(tmp_path):
    meta = tmp_path / "meta.json"
    entries = {
        "a": {"annotation": "a.jsonl", "repeat_time": True},
        "b": {"root": "r", "annotation": "b.jsonl", "repeat_time": 1, "repeat_times": 2, "data_augment": "no"},
        "c": [],
    }
    meta.write_text(json.dumps(entries, indent=2), encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_meta(meta)
    assert caught.value.problems == [
        f"{meta}:2: dataset 'a': missing key 'root'",
        f"{meta}:2: dataset 'a': 'repeat_time' must be a number > 0, got True",
        f"{meta}:6: dataset 'b': unknown key 'repeat_times' (known: root, annotation, repeat_time, data_augment, "
        "max_dynamic_patch, length)",
        f"{meta}:6: dataset 'b': 'data_augment' must be true or false, got 'no'",
        f"{meta}:13: dataset 'c': expected an object, got list",
    ]


def test_meta_invalid_json_names_the_line(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text('{\n  "a": {\n    "root": "x",\n  }\n}\n')
    with pytest.raises(DataError, match=rf"{meta}:4: invalid JSON"):
        load_meta(meta)


def test_samples_are_read_with_images_under_the_root(tmp_path, root):
    annotation = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"id": 7, "image": "images/a.png", "conversations": qa(), "width": 8, "height": 8},
            {"id": "two", "image": ["images/a.png", "images/b.png"], "conversations": qa("<image><image>比较")},
            {"conversations": qa("你好")},
            {"image": "images/b.png", "conversations": [turn("system", "Be brief."), *qa("点击")]},
        ],
    )
    first, second, text_only, with_system = read_samples(spec_for(annotation, root), seed=0)
    assert (first.source, first.line, first.sample_id) == (annotation, 1, "7")
    assert first.images == (root / "images/a.png",)
    assert first.conversations == (("human", "<image>\n点击"), ("gpt", "[[1, 2, 3, 4]]"))
    assert second.images == (root / "images/a.png", root / "images/b.png")
    assert text_only.images == () and text_only.sample_id == "train.jsonl:3"
    assert text_only.conversations[0] == ("human", "你好")
    assert with_system.conversations[:2] == (("system", "Be brief."), ("human", "<image>\n点击"))
    assert with_system.where == f"{annotation}:4"


def test_every_bad_line_is_reported_with_file_and_line(tmp_path, root):
    lines = [
        {"image": "images/a.png", "conversations": qa()},
        '{"image": "images/a.png", "conversations": [}',
        "[1, 2]",
        {"image": "images/a.png"},
        {"conversations": "hello"},
        {"conversations": [turn("gpt", "x"), turn("human", "y")]},
        {"conversations": [turn("human", "x"), turn("gpt", " ")]},
        {"image": "images/a.png", "conversations": qa("<image><image>")},
        {"image": ["images/a.png", "images/b.png"], "conversations": qa("<image>")},
        {"image": "../outside.png", "conversations": qa()},
        {"image": "/etc/passwd", "conversations": qa()},
        {"image": "images/missing.png", "conversations": qa()},
        {"conversations": qa("hi <IMG_CONTEXT>")},
        {"conversations": [turn("human", "x")]},
        {"conversations": [turn("human", "x"), turn("gpt", "<image>")], "image": "images/a.png"},
        {"image": 3, "conversations": qa()},
        {"video": "v.mp4", "conversations": qa()},
    ]
    annotation = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as caught:
        read_samples(spec_for(annotation, root), seed=0)
    reasons = [problem.removeprefix(f"{annotation}:") for problem in caught.value.problems]
    assert reasons == [
        "2: invalid JSON: Expecting value (column 45)",
        "3: expected a JSON object, got list",
        "4: missing 'conversations'",
        "5: 'conversations' must be a non-empty list",
        "6: conversation turn 1 has role 'gpt', expected 'human' (roles alternate human/gpt from human; "
        "a leading system is allowed)",
        "7: conversation turn 2 is an empty gpt answer",
        "8: conversation has 2 <image> placeholder(s) but 1 image(s)",
        "9: conversation has 1 <image> placeholder(s) but 2 image(s)",
        "10: image path '../outside.png' escapes the dataset root",
        "11: image path '/etc/passwd' escapes the dataset root",
        f"12: image file {root / 'images/missing.png'} not found",
        "13: conversation contains the reserved token <IMG_CONTEXT>",
        "14: conversation must end with a gpt answer",
        "15: <image> placeholder outside a human turn (turn 2)",
        "16: 'image' must be a path or a list of non-empty paths",
        "17: video samples are not supported",
    ]
    assert str(caught.value).startswith("16 data problem(s):\n")


def test_path_with_dots_inside_the_root_is_fine(tmp_path, root):
    annotation = write_jsonl(tmp_path / "a.jsonl", [{"image": "images/../images/a.png", "conversations": qa()}])
    (sample,) = read_samples(spec_for(annotation, root), seed=0)
    assert sample.images[0].resolve() == (root / "images/a.png").resolve()


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path, root):
    annotation = write_jsonl(tmp_path / "a.jsonl", [{"conversations": qa("a")}, "", {"conversations": qa("b")}])
    assert [sample.line for sample in read_samples(spec_for(annotation, root), seed=0)] == [1, 3]


def test_missing_annotation_file_is_named(tmp_path, root):
    with pytest.raises(DataError, match="nope.jsonl: annotation file of dataset 'ui' not found"):
        read_samples(spec_for(tmp_path / "nope.jsonl", root), seed=0)


@pytest.mark.parametrize(("repeat_time", "count"), [(1, 10), (2, 20), (2.5, 25), (0.5, 5), (0.25, 2), (1.05, 10)])
def test_repeat_time(tmp_path, root, repeat_time, count):
    annotation = write_jsonl(tmp_path / "a.jsonl", [{"conversations": qa(f"q{i}")} for i in range(10)])
    samples = read_samples(spec_for(annotation, root, repeat_time), seed=3)
    assert len(samples) == count
    copies = int(repeat_time)
    assert [sample.line for sample in samples[: 10 * copies]] == list(range(1, 11)) * copies
    extra = [sample.line for sample in samples[10 * copies :]]
    assert len(set(extra)) == len(extra) and extra == sorted(extra)


def test_fractional_repeat_is_deterministic_per_seed(tmp_path, root):
    annotation = write_jsonl(tmp_path / "a.jsonl", [{"conversations": qa(f"q{i}")} for i in range(40)])
    spec = spec_for(annotation, root, 0.5)
    picks = {seed: [sample.line for sample in read_samples(spec, seed=seed)] for seed in (0, 1)}
    assert picks[0] == [sample.line for sample in read_samples(spec, seed=0)]
    assert picks[0] != picks[1]
