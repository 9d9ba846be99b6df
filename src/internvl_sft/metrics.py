"""Parse model answers for the mobile-UI task families and score them against ground truth.

Families: grounding (answer `[[x1, y1, x2, y2]]`), actor and e2e (answer `操作：<kind>\\n参数：<param>`).
Coordinates live in the 0-1000 normalised space; a value outside it makes a parameter invalid.

Action scoring follows the fork's actor evaluation: a sample gets at most one error, checked in the
order invalid_format -> action_mismatch -> invalid_param or input_mismatch, and `mae_x` / `mae_y`
average absolute coordinate errors over every point (a swipe gives two) of the samples whose action
matched and whose parameters were valid.

`aggregate` returns flat `<family>.<metric>` keys. Counts (`n` and the fork's error counts) are always
present, so an empty family reports `n = 0`. A rate or mean whose denominator is empty is omitted
rather than reported as 0.0, which would read as a measured failure.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from statistics import fmean
from typing import Any

GROUNDING, ACTOR, E2E = "grounding", "actor", "e2e"
CLICK, LONG_PRESS, SWIPE, TYPE = "点击", "长按", "滑动", "输入"
POINT_COUNTS = {CLICK: 1, LONG_PRESS: 1, SWIPE: 2}
ERROR_NAMES = ("invalid_format", "action_mismatch", "invalid_param", "input_mismatch")
POINT_RADII = (50, 100)
IOU_HIT = 0.5
COORD_MAX = 1000.0

GROUNDING_MARKER = "请根据屏幕截图，定位："
E2E_SUFFIX = "的下一步操作"

Point = tuple[float, float]
Box = tuple[float, float, float, float]


@dataclasses.dataclass(frozen=True)
class Action:
    """A UI action: `points` for click / long press / swipe, `text` for typing."""

    kind: str
    points: tuple[Point, ...] = ()
    text: str | None = None


_WRAPPER_TAG = re.compile(r"</?(?:ref|box)>")
_FULL_WIDTH = str.maketrans({"：": ":", "，": ",", "［": "[", "］": "]"})
_ACTION = re.compile(r"操作[^\S\n]*[:：](?P<kind>[^\n]*)\n\s*参数[^\S\n]*[:：](?P<param>[^\n]*)")
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
# One point, optionally in double brackets (`[[x, y]]`, the InternVL grounding style).
_POINT = re.compile(rf"(\[\s*)?\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\](?(1)\s*\])")
_BOX = re.compile(rf"\[\s*\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]\s*\]")
_SWIPE_ARROW = re.compile(r"->|→")


def task_family(prompt: str, answer: str) -> str:
    """Family of a sample, from its prompt and its ground-truth answer."""
    if GROUNDING_MARKER in prompt or "[[" in answer:
        return GROUNDING
    if prompt.rstrip().endswith(E2E_SUFFIX):
        return E2E
    return ACTOR


def _clean(text: str) -> str:
    """Unify line endings and drop `<ref>` / `<box>` tags, keeping what they wrap."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _WRAPPER_TAG.sub("", text)


def _coordinates(values: Sequence[str]) -> tuple[float, ...] | None:
    """Numbers of a match, or None when one is unreadable or outside 0..1000."""
    try:
        numbers = tuple(float(value) for value in values)
    except ValueError:
        return None
    if all(0.0 <= number <= COORD_MAX for number in numbers):
        return numbers
    return None


def split_action(s: str) -> tuple[str, str] | None:
    """(kind, param) of an `操作：...\\n参数：...` answer, stripped; None if the structure is missing.

    Only the line after `参数` is the parameter: lines a model appends afterwards are ignored.
    """
    match = _ACTION.search(_clean(s))
    if match is None:
        return None
    return match["kind"].strip(), match["param"].strip()


def parse_point(param: str) -> Point | None:
    """`[x, y]` (full-width brackets and comma, floats, `[[x, y]]` accepted) -> (x, y)."""
    match = _POINT.fullmatch(param.translate(_FULL_WIDTH).strip())
    if match is None:
        return None
    point = _coordinates(match.group(2, 3))
    return None if point is None else (point[0], point[1])


def parse_points(param: str, count: int) -> tuple[Point, ...] | None:
    """`count` points separated by `->` or `→`; None unless every one of them parses."""
    pieces = _SWIPE_ARROW.split(param)
    if len(pieces) != count:
        return None
    points = [point for point in map(parse_point, pieces) if point is not None]
    return tuple(points) if len(points) == count else None


def action_from_fields(kind: str, param: str) -> Action | None:
    """The action a (kind, param) pair describes; None for an unknown kind or a bad parameter."""
    if kind == TYPE:
        return Action(TYPE, text=param)
    if kind not in POINT_COUNTS:
        return None
    points = parse_points(param, POINT_COUNTS[kind])
    return None if points is None else Action(kind, points)


def parse_action(s: str) -> Action | None:
    """A fully valid action answer -> Action; None if its structure, kind or parameter is bad."""
    fields = split_action(s)
    return None if fields is None else action_from_fields(*fields)


def parse_box(s: str) -> Box | None:
    """First `[[x1, y1, x2, y2]]` in the text; None if absent, out of range or inverted."""
    match = _BOX.search(_clean(s).translate(_FULL_WIDTH))
    if match is None:
        return None
    box = _coordinates(match.groups())
    if box is None or box[0] > box[2] or box[1] > box[3]:
        return None
    return box[0], box[1], box[2], box[3]


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def format_action(action: Action) -> str:
    """The answer text a model is trained to emit for `action`."""
    if action.kind == TYPE:
        param = action.text or ""
    else:
        param = " -> ".join(f"[{_format_number(x)}, {_format_number(y)}]" for x, y in action.points)
    return f"操作：{action.kind}\n参数：{param}"


def box_area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union; two identical zero-area boxes count as a perfect match."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = inter_w * inter_h
    union = box_area(a) + box_area(b) - intersection
    if union <= 0.0:
        return float(a == b)
    return intersection / union


def box_center(box: Box) -> Point:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def box_contains(box: Box, point: Point) -> bool:
    """Borders included."""
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def _ground_truth_action(answer: str) -> Action:
    expected = parse_action(answer)
    if expected is None:
        raise ValueError(f"malformed ground-truth action answer: {answer!r}")
    return expected


def _point_fields(expected: Action, predicted: Action) -> dict[str, Any]:
    """Per-point absolute (dx, dy), Euclidean distances and their mean, start matched to start."""
    deltas = [(abs(p[0] - e[0]), abs(p[1] - e[1])) for p, e in zip(predicted.points, expected.points)]
    distances = [math.hypot(dx, dy) for dx, dy in deltas]
    return {"point_deltas": deltas, "point_distances": distances, "point_error": fmean(distances)}


def _action_outcome(expected: Action, prediction: str) -> dict[str, Any]:
    """The fork's per-sample verdict: the first failing check names the error, None if all pass."""
    fields = split_action(prediction)
    if fields is None:
        return {"error": "invalid_format"}
    predicted = action_from_fields(*fields)
    outcome: dict[str, Any] = {"valid_format": True, "predicted": predicted and dataclasses.asdict(predicted)}
    if fields[0] != expected.kind:
        return {**outcome, "error": "action_mismatch"}
    outcome["action_match"] = True
    if predicted is None:
        return {**outcome, "valid_param": False, "error": "invalid_param"}
    outcome["valid_param"] = True
    if expected.kind == TYPE:
        matched = predicted.text == expected.text
        return {**outcome, "input_match": matched, "error": None if matched else "input_mismatch"}
    return {**outcome, **_point_fields(expected, predicted), "error": None}


def _score_action(family: str, answer: str, prediction: str) -> dict[str, Any]:
    expected = _ground_truth_action(answer)
    defaults: dict[str, Any] = {
        "family": family,
        "expected": dataclasses.asdict(expected),
        "predicted": None,
        "valid_format": False,
        "action_match": False,
        "valid_param": None,
        "input_match": None,
        "point_deltas": [],
        "point_distances": [],
        "point_error": None,
    }
    return {**defaults, **_action_outcome(expected, prediction)}


def _score_grounding(answer: str, prediction: str) -> dict[str, Any]:
    expected = parse_box(answer)
    if expected is None:
        raise ValueError(f"malformed ground-truth box answer: {answer!r}")
    predicted = parse_box(prediction)
    return {
        "family": GROUNDING,
        "expected": expected,
        "predicted": predicted,
        "valid_format": predicted is not None,
        "iou": 0.0 if predicted is None else box_iou(predicted, expected),
        "center_in_box": predicted is not None and box_contains(expected, box_center(predicted)),
    }


def score_sample(prompt: str, answer: str, prediction: str) -> dict[str, Any]:
    """Per-sample result (JSON-serialisable); raises ValueError only for a malformed ground truth.

    Action families: `expected` / `predicted` (Action as a dict), `valid_format`, `action_match`,
    `valid_param` (None unless the action matched), `input_match` (typing only), `error` (one of
    ERROR_NAMES or None), `point_deltas` ([|dx|, |dy|] per point), `point_distances` (Euclidean per
    point) and `point_error` (their mean, None unless a point action matched with valid params).
    Grounding: `expected` / `predicted` boxes, `valid_format`, `iou` (0.0 when unparsed), `center_in_box`.
    """
    family = task_family(prompt, answer)
    if family == GROUNDING:
        return _score_grounding(answer, prediction)
    return _score_action(family, answer, prediction)


def _rate(hits: int, total: int) -> float | None:
    return hits / total if total else None


def _mean(values: Sequence[float]) -> float | None:
    return fmean(values) if values else None


def _is_point_sample(score: Mapping[str, Any]) -> bool:
    return score["expected"]["kind"] in POINT_COUNTS


def points_within(score: Mapping[str, Any], radius: float) -> bool:
    """A point sample whose every point lies within `radius`; wrong or invalid answers miss."""
    distances = score["point_distances"]
    return bool(distances) and all(distance <= radius for distance in distances)


def _point_errors(scores: Sequence[Mapping[str, Any]]) -> list[float]:
    return [s["point_error"] for s in scores if _is_point_sample(s) and s["point_error"] is not None]


def _action_metrics(scores: Sequence[Mapping[str, Any]]) -> dict[str, float | int | None]:
    errors = Counter(s["error"] for s in scores)
    deltas = [delta for s in scores for delta in s["point_deltas"]]
    point_samples = [s for s in scores if _is_point_sample(s)]
    typing_samples = [s for s in scores if s["expected"]["kind"] == TYPE]
    metrics: dict[str, float | int | None] = {"n": len(scores), **{name: errors[name] for name in ERROR_NAMES}}
    metrics["mae_x"] = _mean([dx for dx, _ in deltas])
    metrics["mae_y"] = _mean([dy for _, dy in deltas])
    metrics["format_rate"] = _rate(sum(s["valid_format"] for s in scores), len(scores))
    metrics["action_acc"] = _rate(sum(s["action_match"] for s in scores), len(scores))
    metrics["input_acc"] = _rate(sum(s["error"] is None for s in typing_samples), len(typing_samples))
    for radius in POINT_RADII:
        metrics[f"point_acc@{radius}"] = _rate(sum(points_within(s, radius) for s in point_samples), len(point_samples))
    metrics["point_error"] = _mean(_point_errors(scores))
    return metrics


def _grounding_metrics(scores: Sequence[Mapping[str, Any]]) -> dict[str, float | int | None]:
    n = len(scores)
    return {
        "n": n,
        "parse_rate": _rate(sum(s["valid_format"] for s in scores), n),
        "mean_iou": _mean([s["iou"] for s in scores]),
        f"iou@{IOU_HIT}": _rate(sum(s["iou"] >= IOU_HIT for s in scores), n),
        "center_in_box": _rate(sum(s["center_in_box"] for s in scores), n),
    }


def _overall_metrics(
    scores: Sequence[Mapping[str, Any]], action_scores: Sequence[Mapping[str, Any]]
) -> dict[str, float | int | None]:
    return {
        "n": len(scores),
        "action_acc": _rate(sum(s["action_match"] for s in action_scores), len(action_scores)),
        "point_error": _mean(_point_errors(action_scores)),
    }


def _prefixed(prefix: str, metrics: Mapping[str, float | int | None]) -> dict[str, float | int]:
    """`prefix.key` for every defined value; None marks an empty denominator and is dropped."""
    return {f"{prefix}.{key}": value for key, value in metrics.items() if value is not None}


def aggregate(sample_scores: Iterable[Mapping[str, Any]]) -> dict[str, float | int]:
    """Flat metrics over `score_sample` results, per family and overall (see the module docstring)."""
    scores = list(sample_scores)
    by_family = {family: [s for s in scores if s["family"] == family] for family in (ACTOR, E2E, GROUNDING)}
    metrics: dict[str, float | int] = {}
    for family in (ACTOR, E2E):
        metrics.update(_prefixed(family, _action_metrics(by_family[family])))
    metrics.update(_prefixed(GROUNDING, _grounding_metrics(by_family[GROUNDING])))
    metrics.update(_prefixed("all", _overall_metrics(scores, by_family[ACTOR] + by_family[E2E])))
    return metrics


def mean_point_baseline(train_answers: Iterable[str]) -> Point:
    """Mean point of the train set's click (`点击`) answers; other answers are skipped."""
    clicks = [action.points[0] for action in map(parse_action, train_answers) if action and action.kind == CLICK]
    if not clicks:
        raise ValueError("no click answer to average")
    return fmean(x for x, _ in clicks), fmean(y for _, y in clicks)


def constant_point_prediction(kind: str, point: Point) -> str:
    """The answer "`kind` at `point`" (a swipe starts and ends there), for a constant baseline."""
    if kind not in POINT_COUNTS:
        raise ValueError(f"not a point action: {kind!r}")
    return format_action(Action(kind, (point,) * POINT_COUNTS[kind]))
