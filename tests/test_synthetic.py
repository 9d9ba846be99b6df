"""The embedded synthetic UI dataset: format of the real ui-dataset, determinism, and learnability cues."""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from internvl_sft.data import synthetic
from internvl_sft.data.synthetic import (
    APPS,
    LEXICON,
    NAV_TABS,
    SEARCH_BUTTON_FILL,
    SEARCH_TERMS,
    generate_dataset,
    iter_split,
)

SEED = 7
TRAIN_SCREENS, VAL_SCREENS = 14, 6
META_ROOT = "data/ui-dataset"
RECORD_KEYS = {"id", "image", "width", "height", "conversations"}
POINT = r"\[(\d+), (\d+)\]"
ANSWER_PATTERNS = {
    "actor": re.compile(rf"操作：(点击|长按)\n参数：{POINT}|操作：滑动\n参数：{POINT} -> {POINT}|操作：输入\n参数：\S+"),
    "grounding": re.compile(r"\[\[(\d+), (\d+), (\d+), (\d+)\]\]"),
}
ANSWER_PATTERNS["e2e"] = ANSWER_PATTERNS["actor"]
PROMPT_PATTERNS = {
    "actor": re.compile(r"<image>\n请根据屏幕截图，执行任务：.+"),
    "grounding": re.compile(r"<image>\n请根据屏幕截图，定位：.+"),
    "e2e": re.compile(r"<image>\n请根据屏幕截图，输出“.+”的下一步操作"),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("ui-dataset")
    counts = generate_dataset(out, META_ROOT, seed=SEED, train_screens=TRAIN_SCREENS, val_screens=VAL_SCREENS)
    return out, counts


def read_records(out: Path, split: str) -> list[dict]:
    path = out / "annotations" / f"ui_dataset_{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def family_of(record: dict) -> str:
    return re.fullmatch(r"(?:train|val)_\d{4}_(actor|e2e|grounding)(?:_\d)?", record["id"]).group(1)


def numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


def first_point(answer: str) -> tuple[int, int] | None:
    match = re.search(POINT, answer)
    return (int(match.group(1)), int(match.group(2))) if match else None


def pixel_at(image: Image.Image, point: tuple[int, int]) -> tuple[int, int, int]:
    width, height = image.size
    return image.getpixel((min(int(point[0] * width / 1000), width - 1), min(int(point[1] * height / 1000), height - 1)))


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_writes_byte_identical_files(dataset, tmp_path: Path) -> None:
    out, _ = dataset
    generate_dataset(tmp_path, META_ROOT, seed=SEED, train_screens=TRAIN_SCREENS, val_screens=VAL_SCREENS)
    assert all_files(tmp_path) == all_files(out)


def test_other_seed_gives_other_screens(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    generate_dataset(first, META_ROOT, seed=1, train_screens=2, val_screens=1)
    generate_dataset(second, META_ROOT, seed=2, train_screens=2, val_screens=1)
    assert all_files(first) != all_files(second)


def test_a_screen_does_not_depend_on_the_number_of_screens() -> None:
    few = [(screen.image.tobytes(), samples) for _, screen, samples in iter_split(SEED, "train", 3)]
    more = [(screen.image.tobytes(), samples) for _, screen, samples in iter_split(SEED, "train", 5)]
    assert more[:3] == few


def test_counts_match_lines_and_meta_lengths(dataset) -> None:
    out, counts = dataset
    assert set(counts) == {"train", "val"}
    for split, meta_name in (("train", "ui_dataset.json"), ("val", "ui_dataset_eval.json")):
        assert counts[split] == len(read_records(out, split)) > 0
        meta = json.loads((out / "meta" / meta_name).read_text(encoding="utf-8"))
        assert meta == {"ui-dataset": {
            "root": META_ROOT, "annotation": f"{META_ROOT}/annotations/ui_dataset_{split}.jsonl",
            "data_augment": False, "repeat_time": 1, "length": counts[split]}}


def test_every_line_is_a_sample_in_the_real_format(dataset) -> None:
    out, _ = dataset
    for split in ("train", "val"):
        records = read_records(out, split)
        assert len({r["id"] for r in records}) == len(records)
        for record in records:
            assert set(record) == RECORD_KEYS
            assert re.fullmatch(rf"images/{split}/screen_\d{{4}}\.png", record["image"])
            with Image.open(out / record["image"]) as image:
                assert image.format == "PNG" and image.mode == "RGB"
                assert image.size == (record["width"], record["height"])
            human, gpt = record["conversations"]
            assert (human["from"], gpt["from"]) == ("human", "gpt")
            assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
            assert "<image>" not in gpt["value"]
            family = family_of(record)
            assert PROMPT_PATTERNS[family].fullmatch(human["value"]), human["value"]
            assert ANSWER_PATTERNS[family].fullmatch(gpt["value"]), gpt["value"]


def test_jsonl_is_utf8_without_escapes(dataset) -> None:
    out, _ = dataset
    text = (out / "annotations" / "ui_dataset_train.jsonl").read_text(encoding="utf-8")
    assert "\\u" not in text and "请根据屏幕截图" in text


def test_coordinates_are_normalised_and_boxes_ordered(dataset) -> None:
    out, _ = dataset
    for record in read_records(out, "train") + read_records(out, "val"):
        answer = record["conversations"][1]["value"]
        if family_of(record) != "grounding" and "输入" in answer:
            continue
        values = numbers(answer)
        assert values and all(0 <= v <= 1000 for v in values), answer
        if family_of(record) == "grounding":
            x1, y1, x2, y2 = values
            assert x1 < x2 and y1 < y2


def test_written_lines_follow_the_rendered_screens(dataset) -> None:
    out, _ = dataset
    records = read_records(out, "val")
    expected = [(f"images/val/screen_{index:04d}.png", s.prompt, s.answer)
                for index, _, samples in iter_split(SEED, "val", VAL_SCREENS) for s in samples]
    assert [(r["image"], r["conversations"][0]["value"], r["conversations"][1]["value"]) for r in records] == expected


def test_click_points_land_on_the_element_drawn(dataset) -> None:
    out, _ = dataset
    checked = 0
    for index, screen, samples in iter_split(SEED, "train", TRAIN_SCREENS):
        with Image.open(out / f"images/train/screen_{index:04d}.png") as image:
            image = image.convert("RGB")
            for sample in samples:
                point = first_point(sample.answer)
                if sample.family == "grounding" or sample.target is None or point is None:
                    continue
                assert pixel_at(image, point) == screen.elements[sample.target].colour, sample.prompt
                checked += 1
    assert checked >= TRAIN_SCREENS


def test_cues_have_fixed_colours() -> None:
    """The app named in a click prompt has its brand colour under the point; nav tabs and the button too."""
    expected = {f"点击{app.name}app图标": app.colour for app in APPS}
    expected |= {f"点击底部导航栏的“{tab.label}”选项": tab.colour for tab in NAV_TABS}
    expected["点击搜索按钮"] = SEARCH_BUTTON_FILL
    checked = 0
    for _, screen, samples in iter_split(SEED, "train", 40):
        for sample in samples:
            task = sample.prompt.rpartition("执行任务：")[2]
            if sample.family == "actor" and task in expected:
                assert pixel_at(screen.image, first_point(sample.answer)) == expected[task]
                checked += 1
    assert checked >= 10
    assert len({app.colour for app in APPS}) == len(APPS)
    assert len({(tab.colour, tab.shape) for tab in NAV_TABS}) == len(NAV_TABS)


def test_grounding_boxes_contain_the_element_centre() -> None:
    checked = 0
    for _, screen, samples in iter_split(SEED, "train", 40):
        width, height = screen.size
        for sample in samples:
            if sample.family != "grounding":
                continue
            x1, y1, x2, y2 = numbers(sample.answer)
            cx, cy = screen.elements[sample.target].centre
            assert x1 <= 1000 * cx / width <= x2 and y1 <= 1000 * cy / height <= y2
            checked += 1
    assert checked >= 10


def test_targets_are_large_enough_for_a_coarse_grid() -> None:
    """A 448-px tile of 14-px patches (or a 112-px tile of a tiny model) is a 32x32 (8x8) grid."""
    for _, screen, _ in iter_split(SEED, "train", 60):
        short_side = min(screen.size)
        for element in screen.elements.values():
            x1, y1, x2, y2 = element.box
            assert min(x2 - x1, y2 - y1) >= short_side / 12
            assert (x2 - x1) * (y2 - y1) >= (short_side / 9) ** 2


def test_e2e_next_step_follows_the_screen_state() -> None:
    steps = {"home": "app:", "page": "search_box", "typed": "search_button", "results": "first_result"}
    kinds = Counter()
    for _, screen, samples in iter_split(SEED, "train", 80):
        for sample in (s for s in samples if s.family == "e2e"):
            kinds[screen.kind] += 1
            if screen.kind == "keyboard":
                goal_term = re.search(r"搜索“(.+?)”", sample.prompt).group(1)
                assert sample.answer == f"操作：输入\n参数：{goal_term}"
                continue
            assert sample.answer.startswith("操作：点击\n") and sample.target.startswith(steps[screen.kind])
            if screen.kind != "home":
                assert f"用{screen.app.name}搜索“" in sample.prompt
    assert set(kinds) == {"home", "page", "keyboard", "typed", "results"}


def test_action_type_is_given_by_prompt_or_keyboard() -> None:
    for _, screen, samples in iter_split(SEED, "train", 60):
        for sample in samples:
            if sample.family == "grounding":
                continue
            action = sample.answer.split("\n")[0].removeprefix("操作：")
            if sample.family == "actor":
                task = sample.prompt.rpartition("执行任务：")[2]
                assert action in task, (task, action)
            else:
                assert (action == "输入") == (screen.kind == "keyboard")


def test_family_mix_and_aspect_ratios() -> None:
    samples = [(screen, s) for _, screen, ss in iter_split(SEED, "train", 150) for s in ss]
    shares = Counter(s.family for _, s in samples)
    for family, share in (("actor", 0.45), ("e2e", 0.30), ("grounding", 0.25)):
        assert abs(shares[family] / len(samples) - share) < 0.07
    assert 2.2 <= len(samples) / 150 <= 3.0
    actions = Counter(s.answer.split("\n")[0] for _, s in samples if s.family != "grounding")
    assert {"操作：点击", "操作：长按", "操作：滑动", "操作：输入"} <= set(actions)
    ratios = {round(screen.size[0] / screen.size[1], 2) for screen, _ in samples}
    assert len(ratios) >= 3 and min(ratios) < 0.6 and max(ratios) > 1.5


def test_written_splits_hold_several_aspect_ratios(dataset) -> None:
    out, _ = dataset
    records = read_records(out, "train") + read_records(out, "val")
    assert len({round(r["width"] / r["height"], 2) for r in records}) >= 3


def test_constant_mean_point_is_a_poor_answer() -> None:
    def points(split: str, screens: int) -> list[tuple[int, int]]:
        return [p for _, _, ss in iter_split(SEED, split, screens) for s in ss
                if s.family != "grounding" and (p := first_point(s.answer))]

    train, val = points("train", 120), points("val", 40)
    mean_x, mean_y = statistics.mean(p[0] for p in train), statistics.mean(p[1] for p in train)
    mae_x = statistics.mean(abs(p[0] - mean_x) for p in val)
    mae_y = statistics.mean(abs(p[1] - mean_y) for p in val)
    assert mae_x > 150 and mae_y > 150


def test_lexicon_covers_every_prompt_and_answer() -> None:
    characters = set("".join(LEXICON))
    for _, _, samples in iter_split(SEED, "train", 60):
        for sample in samples:
            assert set(sample.prompt + sample.answer) <= characters, sample.prompt
    for word in [app.name for app in APPS] + [tab.label for tab in NAV_TABS] + list(SEARCH_TERMS):
        assert word in LEXICON
    assert len(LEXICON) == len(set(LEXICON))


@pytest.mark.parametrize("train_screens, val_screens", [(0, 2), (2, 0), (-1, 1)])
def test_screen_counts_must_be_positive(tmp_path: Path, train_screens: int, val_screens: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        generate_dataset(tmp_path, META_ROOT, seed=0, train_screens=train_screens, val_screens=val_screens)


def test_regenerating_removes_stale_screens(tmp_path: Path) -> None:
    generate_dataset(tmp_path, META_ROOT, seed=0, train_screens=4, val_screens=1)
    generate_dataset(tmp_path, META_ROOT, seed=0, train_screens=2, val_screens=1)
    assert sorted(p.name for p in (tmp_path / "images" / "train").iterdir()) == ["screen_0000.png", "screen_0001.png"]


def test_unknown_nav_shape_is_rejected() -> None:
    draw = synthetic.ImageDraw.Draw(Image.new("RGB", (10, 10)))
    with pytest.raises(ValueError, match="hexagon"):
        synthetic.draw_nav_icon(draw, "hexagon", 5, 5, 3, (0, 0, 0))
