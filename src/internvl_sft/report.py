"""One self-contained HTML page about an evaluation: metrics tables and a gallery of annotated screenshots.

Built from the eval stage's metrics JSON and predictions JSONL alone (the screenshots are read from the image
paths the predictions name and embedded as base64 thumbnails), so it can be rebuilt without the models:

    python -m internvl_sft.report --metrics work_dirs/eval/metrics.json \\
        --predictions work_dirs/eval/predictions.jsonl --out work_dirs/eval/report.html

The gallery shows one model's predictions (the fine-tuned one when present), wrong answers first and the
worst of them first. A sample counts as correct when its action, parameter and typed text are right and every
point lies within the larger point-accuracy radius of the target, or, for grounding, when IoU reaches IOU_HIT.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from internvl_sft.data.images import load_image
from internvl_sft.data.template import IMAGE_PLACEHOLDER
from internvl_sft.draw import GROUND_TRUTH, PREDICTION, Mark, Target, annotate
from internvl_sft.metrics import (
    ACTOR,
    COORD_MAX,
    E2E,
    ERROR_NAMES,
    GROUNDING,
    IOU_HIT,
    POINT_RADII,
    Action,
    points_within,
)
from internvl_sft.paths import atomic_write_text

GALLERY_MODEL = "finetuned"
MODEL_ORDER = ("base", "finetuned", "mean_point_baseline")
MODEL_TITLES = {"base": "base", "finetuned": "fine-tuned", "mean_point_baseline": "mean-point baseline"}
FAMILIES = (ACTOR, E2E, GROUNDING)
HEADLINE = (
    ("all.n", "samples"),
    ("eval_loss", "eval loss"),
    ("all.action_acc", "action accuracy"),
    ("all.point_error", "mean point error"),
    ("grounding.mean_iou", "grounding mean IoU"),
    (f"grounding.iou@{IOU_HIT}", f"grounding IoU ≥ {IOU_HIT}"),
)
CORRECT_RADIUS = POINT_RADII[-1]
LOWER_IS_BETTER = frozenset({*ERROR_NAMES, "eval_loss", "mae_x", "mae_y", "point_error"})
THUMBNAIL_SIDE = 480
JPEG_QUALITY = 85
PREDICTION_KEYS = ("model", "id", "image", "prompt", "answer", "prediction", "score")
MAX_ANSWER_CHARS = 80  # an untrained model may ramble: cards show the beginning of its answer
BASELINE_NOTE = ("The mean-point baseline always answers the train set's mean point with the ground-truth action "
                 "type, on the point tasks only: its action accuracy is given, not earned.")


class ReportError(ValueError):
    """An input file the report cannot be built from; the message names the file (and line)."""


# ---------------------------------------------------------------- inputs


def read_metrics(path: Path) -> dict[str, dict[str, float]]:
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from err
    if not isinstance(metrics, dict) or not all(isinstance(block, dict) for block in metrics.values()):
        raise ReportError(f"{path}:1: expected an object of per-model metric objects")
    return metrics


def read_predictions(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ReportError(f"{path}:{number}: not valid JSON: {err.msg}") from err
        missing = [key for key in PREDICTION_KEYS if not isinstance(row, dict) or key not in row]
        if missing:
            raise ReportError(f"{path}:{number}: missing key(s) {', '.join(missing)}")
        rows.append(row)
    return rows


# ---------------------------------------------------------------- metrics tables


def model_names(metrics: Mapping[str, Any]) -> list[str]:
    """Known models in a fixed order, then any other block of the metrics file."""
    return [m for m in MODEL_ORDER if m in metrics] + [m for m in metrics if m not in MODEL_ORDER]


def format_value(name: str, value: float | int | None) -> str:
    """Counts as integers, rates as percentages, IoU and loss with three decimals, distances with one."""
    metric = name.split(".", 1)[-1]
    if value is None:
        return "—"
    if metric == "n" or metric in ERROR_NAMES:
        return str(int(value))
    if metric in ("mean_iou", "eval_loss"):
        return f"{value:.3f}"
    if metric.endswith(("_acc", "_rate", "center_in_box")) or "@" in metric:
        return f"{100 * value:.1f}%"
    return f"{value:.1f}"


def direction(name: str) -> int:
    """+1 when a larger value is better, -1 when smaller is, 0 for sample counts."""
    metric = name.split(".", 1)[-1]
    if metric == "n":
        return 0
    return -1 if metric in LOWER_IS_BETTER else 1


def cell(model: str, name: str, value: float | int | None) -> str:
    key = html.escape(f"{model}.{name}", quote=True)
    return f'<td class="num" data-key="{key}">{format_value(name, value)}</td>'


def delta_cell(name: str, metrics: Mapping[str, Mapping[str, float]]) -> str:
    """Fine-tuned minus base, green when it is an improvement."""
    base, tuned = metrics.get("base", {}).get(name), metrics.get("finetuned", {}).get(name)
    if base is None or tuned is None or direction(name) == 0:
        return '<td class="num">—</td>'
    change = tuned - base
    verdict = "same" if change == 0 else ("better" if change * direction(name) > 0 else "worse")
    sign = "+" if change > 0 else ("−" if change < 0 else "±")
    return f'<td class="num {verdict}">{sign}{format_value(name, abs(change))}</td>'


def headline_table(metrics: Mapping[str, Mapping[str, float]]) -> str:
    header = "".join(f"<th>{html.escape(title)}</th>" for _, title in HEADLINE)
    rows = "".join(
        f"<tr><th>{html.escape(MODEL_TITLES.get(model, model))}</th>"
        + "".join(cell(model, name, metrics[model].get(name)) for name, _ in HEADLINE) + "</tr>"
        for model in model_names(metrics)
    )
    return f'<table id="headline"><thead><tr><th>model</th>{header}</tr></thead><tbody>{rows}</tbody></table>'


def family_metric_names(metrics: Mapping[str, Mapping[str, float]], family: str) -> list[str]:
    """Every `<family>.*` key of any model, in the order the metrics file first lists them."""
    names: dict[str, None] = {}
    for block in metrics.values():
        names.update({key: None for key in block if key.startswith(f"{family}.")})
    return list(names)


def family_table(metrics: Mapping[str, Mapping[str, float]], family: str) -> str:
    models = model_names(metrics)
    header = "".join(f"<th>{html.escape(MODEL_TITLES.get(m, m))}</th>" for m in models)
    arrows = {1: " ↑", -1: " ↓", 0: ""}
    rows = "".join(
        f"<tr><th>{html.escape(name.split('.', 1)[1])}{arrows[direction(name)]}</th>"
        + "".join(cell(m, name, metrics[m].get(name)) for m in models) + delta_cell(name, metrics) + "</tr>"
        for name in family_metric_names(metrics, family)
    )
    return (f'<table class="family" id="family-{family}"><caption>{family}</caption><thead><tr><th>metric</th>'
            f"{header}<th>fine-tuned − base</th></tr></thead><tbody>{rows}</tbody></table>")


# ---------------------------------------------------------------- gallery


@dataclasses.dataclass(frozen=True)
class Verdict:
    correct: bool
    badness: float  # 0 (perfect) .. 1 (no usable answer): orders the gallery, worst first
    note: str


def judge(score: Mapping[str, Any]) -> Verdict:
    if score["family"] == GROUNDING:
        if not score["valid_format"]:
            return Verdict(False, 1.0, "no box in the answer")
        return Verdict(score["iou"] >= IOU_HIT, 1.0 - score["iou"], f"IoU {score['iou']:.2f}")
    if score["error"]:
        return Verdict(False, 1.0, score["error"].replace("_", " "))
    if score["point_error"] is None:
        return Verdict(True, 0.0, "correct")
    within = points_within(score, CORRECT_RADIUS)
    return Verdict(within, min(1.0, score["point_error"] / COORD_MAX), f"point error {score['point_error']:.0f}")


def target(value: Any) -> Target | None:
    """An Action (dict form) or a box (list form) of a score, as `draw` takes it."""
    if isinstance(value, dict):
        return Action(value["kind"], tuple(tuple(p) for p in value.get("points", ())), value.get("text"))
    if isinstance(value, (list, tuple)) and len(value) == 4:
        return tuple(float(v) for v in value)
    return None


def marks(score: Mapping[str, Any]) -> list[Mark]:
    pairs = ((target(score["expected"]), GROUND_TRUTH), (target(score.get("predicted")), PREDICTION))
    return [(t, style) for t, style in pairs if t is not None]


def data_uri(image: Image.Image) -> str:
    """The smaller of PNG (flat synthetic screens) and JPEG (photos, real screenshots)."""
    encodings = []
    for fmt, options, mime in (("PNG", {"optimize": True}, "image/png"),
                               ("JPEG", {"quality": JPEG_QUALITY}, "image/jpeg")):
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        encodings.append((len(buffer.getvalue()), mime, buffer.getvalue()))
    _, mime, data = min(encodings)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def screenshot_html(row: Mapping[str, Any]) -> str:
    """The annotated thumbnail of the screen the action applies to (the last image of the sample)."""
    if not row["image"]:
        return '<div class="noimage">text-only sample</div>'
    path = Path(row["image"][-1])
    if not path.is_file():
        return f'<div class="noimage">image not found: {html.escape(str(path))}</div>'
    picture = annotate(load_image(path), marks(row["score"]), max_side=THUMBNAIL_SIDE)
    return f'<img class="shot" alt="{html.escape(str(row["id"]), quote=True)}" src="{data_uri(picture)}">'


def strip_placeholder(prompt: str) -> str:
    return prompt.replace(f"{IMAGE_PLACEHOLDER}\n", "").replace(IMAGE_PLACEHOLDER, "").strip()


def shorten(answer: str) -> str:
    if not answer:
        return "(empty)"
    return answer if len(answer) <= MAX_ANSWER_CHARS else answer[:MAX_ANSWER_CHARS] + " …"


def card(row: Mapping[str, Any], verdict: Verdict, others: Mapping[str, str]) -> str:
    result = "correct" if verdict.correct else "wrong"
    lines = [("prompt", strip_placeholder(row["prompt"])), ("ground truth", row["answer"]),
             (MODEL_TITLES.get(row["model"], row["model"]), shorten(row["prediction"]))]
    lines += [(MODEL_TITLES.get(model, model), shorten(text)) for model, text in others.items()]
    details = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in lines)
    sample_id = html.escape(str(row["id"]), quote=True)
    family = html.escape(row["score"]["family"], quote=True)
    return (f'<figure class="card {result}" data-id="{sample_id}" data-family="{family}" data-result="{result}">'
            f"{screenshot_html(row)}<figcaption><div class=\"badges\"><span class=\"badge\">{family}</span>"
            f'<span class="badge {result}">{result}</span><span class="note">{html.escape(verdict.note)}</span></div>'
            f"<div class=\"sid\">{sample_id}</div><dl>{details}</dl></figcaption></figure>")


def gallery_model(rows: Sequence[Mapping[str, Any]]) -> str | None:
    models = [row["model"] for row in rows]
    return GALLERY_MODEL if GALLERY_MODEL in models else (models[0] if models else None)


def gallery(rows: Sequence[Mapping[str, Any]]) -> tuple[str, dict[str, int]]:
    """Cards of the gallery model, worst first, and the number of cards per family."""
    shown = gallery_model(rows)
    others: dict[str, dict[str, str]] = {}
    for row in rows:
        if row["model"] != shown:
            others.setdefault(str(row["id"]), {})[row["model"]] = row["prediction"]
    judged = [(row, judge(row["score"])) for row in rows if row["model"] == shown]
    judged.sort(key=lambda pair: (pair[1].correct, -pair[1].badness, str(pair[0]["id"])))
    cards = [card(row, verdict, others.get(str(row["id"]), {}))
             for row, verdict in tqdm(judged, desc="report screenshots", leave=False)]
    counts = {family: sum(row["score"]["family"] == family for row, _ in judged) for family in FAMILIES}
    return "".join(cards), counts


def filters(counts: Mapping[str, int]) -> str:
    families = "".join(f'<option value="{f}">{f} ({n})</option>' for f, n in counts.items() if n)
    return ('<div class="filters"><label>family <select id="filter-family"><option value="all">all</option>'
            f'{families}</select></label><label>result <select id="filter-result"><option value="all">all</option>'
            '<option value="wrong">wrong</option><option value="correct">correct</option></select></label>'
            '<span id="shown-count"></span></div>')


def legend() -> str:
    swatches = "".join(f'<span class="swatch" style="--c:{s.css}"></span>{html.escape(s.label)}'
                       for s in (GROUND_TRUTH, PREDICTION))
    return (f'<p class="legend">{swatches}<span class="shapes">ring: click · double ring: long press · '
            "arrow: swipe (dot at the start) · rectangle: grounding box · caption: typed text</span></p>"
            f'<p class="hint">Correct: right action, valid parameter, same typed text and every point within '
            f"{CORRECT_RADIUS} (of 1000) of the target; grounding: IoU ≥ {IOU_HIT}. Coordinates are 0-1000.</p>")


# ---------------------------------------------------------------- page


STYLE = """
:root { --good: #0a7d38; --bad: #b42318; --line: #d9dde3; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d2330;
       background: #f4f6f8; }
main { max-width: 1280px; margin: 0 auto; padding: 24px; }
h1 { margin: 0 0 4px; font-size: 24px; } h2 { margin: 32px 0 12px; font-size: 18px; }
.sub { color: #5b6472; margin: 0; }
table { border-collapse: collapse; background: #fff; border: 1px solid var(--line); }
th, td { padding: 6px 12px; border-bottom: 1px solid var(--line); text-align: left; }
thead th { background: #eef1f5; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.better { color: var(--good); } td.worse { color: var(--bad); }
.families { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
caption { text-align: left; font-weight: 600; padding: 4px 0; }
.legend, .hint { margin: 4px 0; color: #3b4350; }
.swatch { display: inline-block; width: 14px; height: 14px; border-radius: 3px; background: var(--c);
          margin: 0 6px -2px 12px; }
.swatch:first-child { margin-left: 0; }
.shapes { margin-left: 16px; color: #5b6472; }
.filters { display: flex; gap: 16px; align-items: center; margin: 12px 0; }
select { font: inherit; padding: 2px 6px; }
#shown-count { color: #5b6472; }
#gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 16px; }
.card { margin: 0; background: #fff; border: 1px solid var(--line); border-top: 4px solid var(--good);
        border-radius: 6px; overflow: hidden; display: flex; flex-direction: column; }
.card.wrong { border-top-color: var(--bad); }
[hidden] { display: none !important; }
.shot { display: block; width: 100%; height: auto; background: #eee; }
.noimage { padding: 24px; color: #5b6472; background: #eee; }
figcaption { padding: 8px 10px; font-size: 12.5px; }
.badges { display: flex; gap: 6px; align-items: center; flex-wrap: wrap; }
.badge { border-radius: 10px; padding: 0 8px; background: #eef1f5; }
.badge.correct { background: #d9f2e3; color: var(--good); } .badge.wrong { background: #fbe1de; color: var(--bad); }
.note { color: #5b6472; }
.sid { font-family: ui-monospace, monospace; color: #5b6472; margin: 4px 0; }
dl { margin: 0; display: grid; grid-template-columns: auto 1fr; gap: 2px 8px; }
dt { color: #5b6472; } dd { margin: 0; white-space: pre-wrap; word-break: break-word; }
"""

SCRIPT = """
const family = document.getElementById('filter-family');
const result = document.getElementById('filter-result');
function applyFilters() {
  const cards = document.querySelectorAll('#gallery .card');
  let shown = 0;
  for (const card of cards) {
    const visible = (family.value === 'all' || card.dataset.family === family.value)
      && (result.value === 'all' || card.dataset.result === result.value);
    card.hidden = !visible;
    shown += visible ? 1 : 0;
  }
  document.getElementById('shown-count').textContent = shown + ' of ' + cards.length + ' shown';
}
family.addEventListener('change', applyFilters);
result.addEventListener('change', applyFilters);
applyFilters();
"""


def render(metrics: Mapping[str, Mapping[str, float]], rows: Sequence[Mapping[str, Any]]) -> str:
    """The whole page as one string: no external file, font, script or request."""
    cards, counts = gallery(rows)
    shown = gallery_model(rows)
    families = "".join(family_table(metrics, f) for f in FAMILIES if family_metric_names(metrics, f))
    baseline_note = f'<p class="hint">{html.escape(BASELINE_NOTE)}</p>' if "mean_point_baseline" in metrics else ""
    title = f"validation screenshots: {html.escape(MODEL_TITLES.get(shown, shown or '-'))} predictions"
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1"><title>Evaluation report</title>'
        f"<style>{STYLE}</style></head><body><main><h1>Evaluation report</h1>"
        f'<p class="sub">{sum(counts.values())} validation samples; models: '
        f"{html.escape(', '.join(MODEL_TITLES.get(m, m) for m in model_names(metrics)))}</p>"
        f"<h2>Headline</h2>{headline_table(metrics)}{baseline_note}"
        f'<h2>Per task family</h2><div class="families">{families}</div>'
        f"<h2>{title}</h2>{legend()}{filters(counts)}"
        f'<div id="gallery">{cards}</div></main><script>{SCRIPT}</script></body></html>\n'
    )


def write_report(metrics: Mapping[str, Mapping[str, float]], rows: Iterable[Mapping[str, Any]], out: Path) -> None:
    atomic_write_text(Path(out), render(metrics, list(rows)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", required=True, help="metrics JSON written by the eval stage")
    parser.add_argument("--predictions", required=True, help="predictions JSONL written by the eval stage")
    parser.add_argument("--out", required=True, help="HTML file to write")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    write_report(read_metrics(Path(args.metrics)), read_predictions(Path(args.predictions)), Path(args.out))
    print(f"report written to {args.out}")


if __name__ == "__main__":
    main()
