import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from internvl_sft.metrics import (
    ACTOR,
    CLICK,
    E2E,
    GROUNDING,
    LONG_PRESS,
    SWIPE,
    TYPE,
    Action,
    aggregate,
    box_iou,
    constant_point_prediction,
    format_action,
    mean_point_baseline,
    parse_action,
    parse_box,
    score_sample,
    task_family,
)

ACTOR_PROMPT = "<image>\n请根据屏幕截图，执行任务：点击底部导航栏的“发现”选项"
E2E_PROMPT = "<image>\n请根据屏幕截图，输出“在淘宝搜索耳机”的下一步操作"
GROUNDING_PROMPT = "<image>\n请根据屏幕截图，定位：搜索框"


def click(x: float, y: float) -> str:
    return f"操作：点击\n参数：[{x}, {y}]"


def long_press(x: float, y: float) -> str:
    return f"操作：长按\n参数：[{x}, {y}]"


def swipe(x1: float, y1: float, x2: float, y2: float) -> str:
    return f"操作：滑动\n参数：[{x1}, {y1}] -> [{x2}, {y2}]"


def type_text(text: str) -> str:
    return f"操作：输入\n参数：{text}"


# --- task families -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "answer", "family"),
    [
        (ACTOR_PROMPT, click(481, 472), ACTOR),
        (E2E_PROMPT, click(481, 472), E2E),
        (E2E_PROMPT + " \n", click(481, 472), E2E),
        (GROUNDING_PROMPT, "[[10, 20, 30, 40]]", GROUNDING),
        (ACTOR_PROMPT, "[[10, 20, 30, 40]]", GROUNDING),
        (ACTOR_PROMPT, type_text("金融科技"), ACTOR),
    ],
)
def test_task_family(prompt: str, answer: str, family: str) -> None:
    assert task_family(prompt, answer) == family


# --- parse_action: accepted variants --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("操作：点击\n参数：[481, 472]", Action(CLICK, ((481, 472),))),
        ("操作：长按\n参数：[10, 990]", Action(LONG_PRESS, ((10, 990),))),
        ("操作：滑动\n参数：[704, 130] -> [83, 130]", Action(SWIPE, ((704, 130), (83, 130)))),
        ("操作：输入\n参数：金融科技", Action(TYPE, text="金融科技")),
        ("操作：点击\n参数：[0, 1000]", Action(CLICK, ((0, 1000),))),
    ],
)
def test_parse_action_canonical(text: str, expected: Action) -> None:
    assert parse_action(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "操作： 点击 \n 参数：[ 481 ,  472 ] ",  # extra spaces
        "  \n操作：点击\n参数：[481, 472]\n\n",  # leading / trailing whitespace
        "操作：点击\n参数：［481，472］",  # full-width brackets and comma
        "操作:点击\n参数:[481, 472]",  # ASCII colons
        "操作 : 点击\n参数 : [481, 472]",
        "操作：点击\r\n参数：[481, 472]\r\n",  # CRLF
        "操作：点击\r参数：[481, 472]",  # lone CR
        "操作：点击\n参数：[481.0, 472.00]",  # floats
        "操作：点击\n参数：<box>[[481, 472]]</box>",  # box wrapper, double brackets
        "操作：点击\n参数：[[481, 472]]",
        "<ref>操作：点击\n参数：[481, 472]</ref>",  # ref wrapper
        "好的。操作：点击\n参数：[481, 472]",  # leading chatter
        "操作：点击\n参数：[481, 472]\n因为按钮在这里",  # trailing line is not the param
        "操作：点击\n\n参数：[481, 472]",  # blank line between the fields
        "操作：点击\n参数：[４８１, 472]",  # full-width digits
    ],
)
def test_parse_action_accepts_click_variants(text: str) -> None:
    assert parse_action(text) == Action(CLICK, ((481.0, 472.0),))


@pytest.mark.parametrize(
    "param",
    ["[704, 130] -> [83, 130]", "[704, 130]→[83, 130]", "[704,130] → [83,130]", "［704，130］->［83，130］"],
)
def test_parse_action_accepts_swipe_arrows(param: str) -> None:
    assert parse_action(f"操作：滑动\n参数：{param}") == Action(SWIPE, ((704, 130), (83, 130)))


def test_parse_action_keeps_float_coordinates() -> None:
    assert parse_action("操作：点击\n参数：[481.5, .25]") == Action(CLICK, ((481.5, 0.25),))


def test_parse_action_type_text_is_kept_exactly_apart_from_outer_whitespace() -> None:
    assert parse_action("操作：输入\n参数： 你好，世界 [1] \r\n") == Action(TYPE, text="你好，世界 [1]")
    assert parse_action("操作：输入\n参数：") == Action(TYPE, text="")


# --- parse_action: rejected variants --------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "点击 [481, 472]",
        "操作：点击 参数：[481, 472]",  # no line break
        "操作：点击",  # no 参数 line
        "参数：[481, 472]",  # no 操作 line
        "操作：点击\n参数：[1001, 472]",  # out of range
        "操作：点击\n参数：[-1, 472]",
        "操作：点击\n参数：[481, 1e9]",
        "操作：点击\n参数：[481]",  # one number
        "操作：点击\n参数：[481, 472, 3]",
        "操作：点击\n参数：481, 472",  # no brackets
        "操作：点击\n参数：[481, 472]]",  # unbalanced brackets
        "操作：点击\n参数：[481, 472] 左右",  # junk after the point
        "操作：点击\n参数：[a, b]",
        "操作：点击\n参数：[nan, 472]",
        "操作：点击\n参数：[704, 130] -> [83, 130]",  # a click with two points
        "操作：滑动\n参数：[704, 130]",  # a swipe with one point
        "操作：滑动\n参数：[704, 130] [83, 130]",  # no arrow
        "操作：滑动\n参数：[704, 130] -> [83, 130] -> [1, 1]",
        "操作：返回\n参数：",  # unknown kind
    ],
)
def test_parse_action_rejects(text: str) -> None:
    assert parse_action(text) is None


# --- parse_box ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "[[10, 20, 300, 400]]",
        "  [[ 10 ,20,  300 , 400 ]]\n",
        "［［10，20，300，400］］",
        "[[10.0, 20, 300.00, 400]]",
        "<box>[[10, 20, 300, 400]]</box>",
        "<ref>搜索框</ref><box>[[10, 20, 300, 400]]</box>",
        "搜索框在这里：\r\n[[10, 20, 300, 400]]\r\n",
        "[ [10, 20, 300, 400] ]",
    ],
)
def test_parse_box_accepts(text: str) -> None:
    assert parse_box(text) == (10.0, 20.0, 300.0, 400.0)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[10, 20, 300, 400]",  # single brackets
        "[[10, 20, 300]]",
        "[[10, 20, 300, 1001]]",  # out of range
        "[[-5, 20, 300, 400]]",
        "[[300, 20, 10, 400]]",  # inverted
        "[[10, 400, 300, 20]]",
        "操作：点击\n参数：[481, 472]",
    ],
)
def test_parse_box_rejects(text: str) -> None:
    assert parse_box(text) is None


# --- IoU ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "iou"),
    [
        ((0, 0, 100, 100), (0, 0, 100, 100), 1.0),
        ((0, 0, 100, 100), (50, 50, 150, 150), 2500 / 17500),
        ((0, 0, 100, 100), (25, 25, 75, 75), 0.25),
        ((0, 0, 100, 100), (0, 0, 100, 50), 0.5),
        ((0, 0, 100, 100), (100, 0, 200, 100), 0.0),  # touching edges
        ((0, 0, 10, 10), (500, 500, 600, 600), 0.0),
        ((5, 5, 5, 5), (5, 5, 5, 5), 1.0),  # identical zero-area boxes
        ((5, 5, 5, 5), (6, 6, 6, 6), 0.0),
    ],
)
def test_box_iou(a, b, iou: float) -> None:
    assert box_iou(a, b) == pytest.approx(iou)
    assert box_iou(b, a) == pytest.approx(iou)


# --- score_sample: the fork's per-sample verdicts -------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "prediction", "error"),
    [
        (click(481, 472), "我不知道", "invalid_format"),
        (click(481, 472), "操作：点击 [481, 472]", "invalid_format"),
        (click(481, 472), long_press(481, 472), "action_mismatch"),
        (click(481, 472), "操作：返回\n参数：", "action_mismatch"),
        (click(481, 472), "操作：长按\n参数：garbage", "action_mismatch"),  # kind first, nothing else
        (type_text("金融科技"), "操作：点击\n参数：[1, 2]", "action_mismatch"),
        (click(481, 472), "操作：点击\n参数：[481, 1472]", "invalid_param"),
        (click(481, 472), "操作：点击\n参数：481, 472", "invalid_param"),
        (long_press(10, 10), "操作：长按\n参数：[10, 10] -> [20, 20]", "invalid_param"),
        (swipe(704, 130, 83, 130), "操作：滑动\n参数：[704, 130]", "invalid_param"),
        (type_text("金融科技"), type_text("金融"), "input_mismatch"),
        (type_text("hello"), type_text("Hello"), "input_mismatch"),
        (click(481, 472), click(900, 900), None),  # far, but no error in the fork's sense
        (type_text("金融科技"), "  操作：输入\r\n参数：金融科技 ", None),
        (swipe(704, 130, 83, 130), "操作：滑动\n参数：[700, 130]→[80, 130]", None),
    ],
)
def test_score_sample_error(answer: str, prediction: str, error: str | None) -> None:
    assert score_sample(ACTOR_PROMPT, answer, prediction)["error"] == error


def test_score_sample_flags_on_a_matched_click() -> None:
    score = score_sample(E2E_PROMPT, click(100, 200), "操作：点击\n参数：［130，160］")
    assert score["family"] == E2E
    assert score["valid_format"] and score["action_match"] and score["valid_param"]
    assert score["expected"] == {"kind": CLICK, "points": ((100.0, 200.0),), "text": None}
    assert score["predicted"]["points"] == ((130.0, 160.0),)
    assert score["point_deltas"] == [(30.0, 40.0)]
    assert score["point_error"] == 50.0
    json.dumps(score)


def test_score_sample_flags_on_failures() -> None:
    unformatted = score_sample(ACTOR_PROMPT, click(1, 2), "click (1, 2)")
    assert not unformatted["valid_format"] and not unformatted["action_match"]
    assert unformatted["predicted"] is None and unformatted["point_error"] is None
    bad_param = score_sample(ACTOR_PROMPT, click(1, 2), "操作：点击\n参数：[1, 2000]")
    assert bad_param["valid_format"] and bad_param["action_match"] and bad_param["valid_param"] is False
    mismatch = score_sample(ACTOR_PROMPT, click(1, 2), long_press(1, 2))
    assert mismatch["valid_param"] is None and mismatch["point_deltas"] == []
    assert mismatch["predicted"] == {"kind": LONG_PRESS, "points": ((1.0, 2.0),), "text": None}


def test_score_sample_swipe_pairs_start_with_start() -> None:
    score = score_sample(ACTOR_PROMPT, swipe(700, 100, 100, 100), swipe(730, 140, 100, 105))
    assert score["point_deltas"] == [(30.0, 40.0), (0.0, 5.0)]
    assert score["point_error"] == pytest.approx(27.5)


def test_score_sample_grounding() -> None:
    hit = score_sample(GROUNDING_PROMPT, "[[0, 0, 100, 100]]", "<box>[[50, 50, 150, 150]]</box>")
    assert hit["family"] == GROUNDING and hit["valid_format"]
    assert hit["iou"] == pytest.approx(1 / 7)
    assert hit["center_in_box"]
    miss = score_sample(GROUNDING_PROMPT, "[[0, 0, 100, 100]]", "在左上角")
    assert miss == {**miss, "valid_format": False, "predicted": None, "iou": 0.0, "center_in_box": False}
    json.dumps(hit)


def test_score_sample_rejects_malformed_ground_truth() -> None:
    with pytest.raises(ValueError, match="ground-truth"):
        score_sample(ACTOR_PROMPT, "点击这里", click(1, 2))
    with pytest.raises(ValueError, match="ground-truth"):
        score_sample(GROUNDING_PROMPT, "[[1, 2]]", "[[1, 2, 3, 4]]")


# --- aggregate ------------------------------------------------------------------------------------


def test_aggregate_action_counts_rates_and_errors() -> None:
    samples = [
        (click(100, 100), click(130, 140)),  # distance 50
        (long_press(500, 500), long_press(500, 580)),  # distance 80
        (swipe(700, 100, 100, 100), swipe(700, 100, 100, 300)),  # distances 0 and 200
        (click(300, 300), "操作：点击\n参数：[300, 3000]"),  # invalid_param
        (click(300, 300), long_press(300, 300)),  # action_mismatch
        (type_text("好"), type_text("好")),
        (type_text("好"), type_text("坏")),  # input_mismatch
        (type_text("好"), "好"),  # invalid_format
    ]
    metrics = aggregate(score_sample(ACTOR_PROMPT, a, p) for a, p in samples)
    assert metrics["actor.n"] == 8
    assert metrics["actor.invalid_format"] == 1
    assert metrics["actor.action_mismatch"] == 1
    assert metrics["actor.invalid_param"] == 1
    assert metrics["actor.input_mismatch"] == 1
    assert metrics["actor.format_rate"] == 7 / 8
    assert metrics["actor.action_acc"] == 6 / 8
    assert metrics["actor.input_acc"] == 1 / 3
    # Points: (30, 40), (0, 80), (0, 0), (0, 200); the swipe gives two.
    assert metrics["actor.mae_x"] == 30 / 4
    assert metrics["actor.mae_y"] == 320 / 4
    # Five point samples: only the click is within 50; the swipe's end is 200 off.
    assert metrics["actor.point_acc@50"] == 1 / 5
    assert metrics["actor.point_acc@100"] == 2 / 5
    assert metrics["actor.point_error"] == pytest.approx((50 + 80 + 100) / 3)
    assert metrics["all.n"] == 8
    assert metrics["all.action_acc"] == 6 / 8


def test_aggregate_grounding() -> None:
    samples = [
        ("[[0, 0, 100, 100]]", "[[0, 0, 100, 100]]"),  # iou 1, centre in
        ("[[0, 0, 100, 100]]", "[[0, 0, 100, 50]]"),  # iou 0.5, centre in
        ("[[0, 0, 100, 100]]", "[[50, 50, 150, 150]]"),  # iou 1/7, centre (100, 100) on the border
        ("[[0, 0, 100, 100]]", "[[200, 200, 300, 300]]"),  # iou 0, centre out
        ("[[0, 0, 100, 100]]", "不知道"),  # unparsed
    ]
    metrics = aggregate(score_sample(GROUNDING_PROMPT, a, p) for a, p in samples)
    assert metrics["grounding.n"] == 5
    assert metrics["grounding.parse_rate"] == 4 / 5
    assert metrics["grounding.mean_iou"] == pytest.approx((1 + 0.5 + 1 / 7) / 5)
    assert metrics["grounding.iou@0.5"] == 2 / 5
    assert metrics["grounding.center_in_box"] == 3 / 5
    assert metrics["all.n"] == 5
    assert "all.action_acc" not in metrics


def test_aggregate_overall_mixes_actor_and_e2e() -> None:
    scores = [
        score_sample(ACTOR_PROMPT, click(0, 0), click(30, 40)),
        score_sample(E2E_PROMPT, click(0, 0), click(0, 10)),
        score_sample(E2E_PROMPT, click(0, 0), long_press(0, 0)),
        score_sample(GROUNDING_PROMPT, "[[0, 0, 10, 10]]", "[[0, 0, 10, 10]]"),
    ]
    metrics = aggregate(scores)
    assert (metrics["actor.n"], metrics["e2e.n"], metrics["grounding.n"], metrics["all.n"]) == (1, 2, 1, 4)
    assert metrics["e2e.action_mismatch"] == 1
    assert metrics["all.action_acc"] == 2 / 3
    assert metrics["all.point_error"] == 30.0


def test_aggregate_empty_keeps_counts_and_omits_undefined_rates() -> None:
    metrics = aggregate([])
    counts = ("n", "invalid_format", "action_mismatch", "invalid_param", "input_mismatch")
    expected = {f"{family}.{key}": 0 for family in (ACTOR, E2E) for key in counts}
    assert metrics == {**expected, "grounding.n": 0, "all.n": 0}


def test_aggregate_omits_point_metrics_without_point_samples() -> None:
    metrics = aggregate([score_sample(ACTOR_PROMPT, type_text("a"), type_text("a"))])
    assert metrics["actor.input_acc"] == 1.0
    assert not any(key.endswith(("mae_x", "mae_y", "point_error", "@50", "@100")) for key in metrics)
    json.dumps(metrics)


def test_aggregate_reproduces_the_forks_published_actor_numbers() -> None:
    """A val set built so that the fork's counts come out as published for its actor model."""
    # Five scored points whose absolute errors sum to (331, 259): means (66.2, 51.8).
    val = [
        (click(100, 200), "操作：点击\n参数：[150, 260]"),  # (50, 60)
        (click(500, 500), "操作：点击\n参数：［420，450］"),  # (80, 50)
        (long_press(300, 700), " 操作：长按\r\n参数：[370, 655]"),  # (70, 45)
        (swipe(704, 130, 83, 130), "操作：滑动\n参数：[640, 180] → [150, 76]"),  # (64, 50) and (67, 54)
        (click(481, 472), long_press(481, 472)),  # the one action mismatch: no point counted
        (type_text("金融科技"), type_text("金融")),
        (type_text("hello"), type_text("Hello")),
        (type_text("北京天气"), type_text("北京 天气")),
        (type_text("耳机"), type_text("耳机")),
        (type_text("外卖"), "操作：输入\n参数：外卖\n"),
    ]
    metrics = aggregate(score_sample(ACTOR_PROMPT, answer, prediction) for answer, prediction in val)
    assert metrics["actor.n"] == 10
    assert metrics["actor.invalid_format"] == 0
    assert metrics["actor.invalid_param"] == 0
    assert metrics["actor.action_mismatch"] == 1
    assert metrics["actor.input_mismatch"] == 3
    assert (metrics["actor.mae_x"], metrics["actor.mae_y"]) == (66.2, 51.8)


# --- baseline -------------------------------------------------------------------------------------


def test_mean_point_baseline_averages_clicks_only() -> None:
    answers = [click(100, 200), click(300, 600), long_press(900, 900), type_text("x"), "[[1, 2, 3, 4]]"]
    assert mean_point_baseline(answers) == (200.0, 400.0)
    with pytest.raises(ValueError):
        mean_point_baseline([type_text("x")])


def test_constant_point_prediction_scores_as_the_mean_point() -> None:
    mean = mean_point_baseline([click(100, 200), click(301, 600)])
    prediction = constant_point_prediction(CLICK, mean)
    assert parse_action(prediction) == Action(CLICK, ((200.5, 400.0),))
    assert score_sample(ACTOR_PROMPT, click(200.5, 430), prediction)["point_error"] == 30.0
    assert parse_action(constant_point_prediction(SWIPE, (1, 2))) == Action(SWIPE, ((1, 2), (1, 2)))
    with pytest.raises(ValueError):
        constant_point_prediction(TYPE, mean)


# --- properties -----------------------------------------------------------------------------------

coordinates = st.floats(min_value=0, max_value=1000, allow_nan=False)
points = st.tuples(coordinates, coordinates)
point_actions = st.one_of(
    st.builds(lambda p: Action(CLICK, (p,)), points),
    st.builds(lambda p: Action(LONG_PRESS, (p,)), points),
    st.builds(lambda a, b: Action(SWIPE, (a, b)), points, points),
)
typed_texts = st.text().map(lambda text: text.replace("\r", "").replace("\n", "").strip()).filter(
    lambda text: "<ref>" not in text and "</ref>" not in text and "<box>" not in text and "</box>" not in text
)


@given(point_actions | st.builds(lambda text: Action(TYPE, text=text), typed_texts))
def test_parse_action_round_trips_format_action(action: Action) -> None:
    assert parse_action(format_action(action)) == action


@given(coordinates, coordinates, coordinates, coordinates)
def test_parse_box_round_trips(a: float, b: float, c: float, d: float) -> None:
    box = (min(a, c), min(b, d), max(a, c), max(b, d))
    assert parse_box(f"[[{box[0]!r}, {box[1]!r}, {box[2]!r}, {box[3]!r}]]") == box


answer_like = st.text(alphabet="操作参数点击长按滑动输入：:，,[]［］0123456789.-e+>→ \n\r\t<>/refbox")


@given(st.one_of(st.text(), answer_like))
def test_parsers_never_raise(text: str) -> None:
    parse_action(text)
    parse_box(text)
    for answer in (click(1, 2), swipe(1, 2, 3, 4), type_text("x"), "[[1, 2, 3, 4]]"):
        score = score_sample(ACTOR_PROMPT, answer, text)
        assert score["valid_format"] in (True, False)
        aggregate([score])


@given(st.lists(point_actions, min_size=1, max_size=5), st.lists(st.one_of(st.text(), answer_like), max_size=5))
def test_aggregate_rates_stay_in_unit_interval(actions: list[Action], predictions: list[str]) -> None:
    scores = [score_sample(ACTOR_PROMPT, format_action(a), p) for a, p in zip(actions, predictions)]
    for key, value in aggregate(scores).items():
        assert math.isfinite(value)
        if key.endswith(("_rate", "_acc", "@50", "@100")):
            assert 0.0 <= value <= 1.0
