"""Property-based tests: the JSONL reader and the answer parsers take any input without raising."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from internvl_sft.data.meta import DatasetSpec, scan_annotation
from internvl_sft.metrics import (
    CLICK,
    LONG_PRESS,
    SWIPE,
    TYPE,
    Action,
    format_action,
    parse_action,
    parse_box,
    score_sample,
)

FAST = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Pieces of real answers, so that generated text often gets deep into the parsers.
ANSWER_PIECES = ["操作", "参数", "：", ":", "\n", "\r\n", "[", "]", "［", "］", "[[", "]]", ",", "，", " -> ", "→",
                 "<ref>", "</ref>", "<box>", "</box>", "点击", "长按", "滑动", "输入", "-", ".", "e5", "1000", "0", "481"]
answer_like = st.lists(st.one_of(st.sampled_from(ANSWER_PIECES), st.text(max_size=3)), max_size=20).map("".join)
any_text = st.one_of(st.text(), answer_like)
coordinate = st.integers(min_value=0, max_value=1000)
point = st.tuples(coordinate, coordinate).map(lambda xy: (float(xy[0]), float(xy[1])))
typed = st.text(alphabet=st.characters(categories=["L", "N"]) | st.sampled_from(" ，。"), max_size=12).map(str.strip)
actions = st.one_of(
    st.builds(lambda kind, p: Action(kind, (p,)), st.sampled_from([CLICK, LONG_PRESS]), point),
    st.builds(lambda a, b: Action(SWIPE, (a, b)), point, point),
    st.builds(lambda text: Action(TYPE, text=text), typed),
)


@FAST
@given(any_text)
def test_parse_action_never_raises(text):
    action = parse_action(text)
    assert action is None or isinstance(action, Action)


@FAST
@given(any_text)
def test_parse_box_never_raises_and_returns_ordered_boxes_in_range(text):
    box = parse_box(text)
    if box is not None:
        x1, y1, x2, y2 = box
        assert 0 <= x1 <= x2 <= 1000 and 0 <= y1 <= y2 <= 1000


@FAST
@given(actions)
def test_formatted_action_parses_back(action):
    assert parse_action(format_action(action)) == action


@FAST
@given(actions, any_text)
def test_any_prediction_is_scored(action, prediction):
    score = score_sample("请根据屏幕截图，执行任务：点击微信", format_action(action), prediction)
    assert score["valid_format"] in (True, False)
    json.dumps(score)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)
turns = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", "user"]), "value": any_text})
items = st.fixed_dictionaries(
    {},
    optional={
        "id": json_values,
        "image": st.one_of(st.sampled_from(["a.png", "../a.png", "/a.png", "", "missing.png"]), json_values),
        "conversations": st.one_of(st.lists(turns, max_size=4), json_values),
    },
)
lines = st.one_of(items.map(lambda item: json.dumps(item).encode()), json_values.map(lambda v: json.dumps(v).encode()),
                  st.binary(max_size=40))


@FAST
@given(st.lists(lines, max_size=8))
def test_jsonl_reader_accounts_for_every_line(tmp_path_factory, annotation_lines):
    root = tmp_path_factory.mktemp("jsonl")
    (root / "a.png").write_bytes(b"")
    annotation = root / "a.jsonl"
    annotation.write_bytes(b"".join(line.replace(b"\n", b" ") + b"\n" for line in annotation_lines))
    spec = DatasetSpec("ui", root, annotation, 1.0, data_augment=False, max_dynamic_patch=None, length=None)
    samples, problems = scan_annotation(spec)
    bad = {problem.line for problem in problems}
    good = {sample.line for sample in samples}
    filled = {number for number, line in enumerate(annotation_lines, start=1) if line.replace(b"\n", b" ").strip()}
    assert not bad & good and bad | good == filled
    assert all(str(problem).startswith(f"{annotation}:{problem.line}: ") for problem in problems)
    assert all(image.resolve().is_relative_to(root.resolve()) for sample in samples for image in sample.images)
