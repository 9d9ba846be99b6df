"""The HTML report: what a browser shows (tables, annotated screenshots, filters) and how bad input is named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import page_in_chromium
from PIL import Image, ImageDraw

from internvl_sft import report
from internvl_sft.metrics import aggregate, score_sample

ROOT = Path(__file__).resolve().parents[1]
ACTOR = "<image>\n请根据屏幕截图，执行任务：点击“设置”"
E2E = "<image>\n请根据屏幕截图，输出“打开微博”的下一步操作"
GROUNDING = "<image>\n请根据屏幕截图，定位：搜索框"
SWIPE = "操作：滑动\n参数：[200, 500] -> [800, 500]"
# id: (prompt, ground truth, fine-tuned prediction); the base model answers nothing usable.
SAMPLES = {
    "click_close": (ACTOR, "操作：点击\n参数：[500, 500]", "操作：点击\n参数：[510, 505]"),
    "type_wrong": (ACTOR, "操作：输入\n参数：耳机", "操作：输入\n参数：电影票"),
    "click_garbage": (ACTOR, "操作：点击\n参数：[100, 900]", "hello"),
    "swipe_exact": (E2E, SWIPE, SWIPE),
    "box_partial": (GROUNDING, "[[100, 100, 300, 300]]", "[[200, 200, 400, 400]]"),
    "box_exact": (GROUNDING, "[[100, 100, 300, 300]]", "[[100, 100, 300, 300]]"),
}
WRONG = {"type_wrong", "click_garbage", "box_partial"}
GROUNDING_IDS = {"box_partial", "box_exact"}


def screenshot(path: Path, colour: tuple[int, int, int]) -> Path:
    image = Image.new("RGB", (90, 180), colour)
    ImageDraw.Draw(image).rectangle((10, 10, 80, 40), fill=(240, 240, 240))
    image.save(path)
    return path


def prediction_rows(tmp: Path) -> list[dict]:
    rows = []
    for index, (sample_id, (prompt, answer, tuned)) in enumerate(SAMPLES.items()):
        image = screenshot(tmp / f"{sample_id}.png", (40 * index, 90, 160))
        for model, prediction in (("finetuned", tuned), ("base", "hello hello")):
            rows.append({"model": model, "id": sample_id, "image": [str(image)], "prompt": prompt, "answer": answer,
                         "prediction": prediction, "score": score_sample(prompt, answer, prediction)})
    return rows


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """metrics.json + predictions.jsonl as the eval stage writes them, and the report the CLI makes of them."""
    tmp = tmp_path_factory.mktemp("report")
    rows = prediction_rows(tmp)
    metrics = {model: aggregate(r["score"] for r in rows if r["model"] == model) for model in ("finetuned", "base")}
    (tmp / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    (tmp / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    report.main(["--metrics", str(tmp / "metrics.json"), "--predictions", str(tmp / "predictions.jsonl"),
                 "--out", str(tmp / "report.html")])
    return tmp / "report.html"


def test_report_is_one_file_without_external_references(built):
    page = built.read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page
    assert page.count('src="data:image/') == len(SAMPLES)


def test_bad_prediction_line_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"model": "base"}\n', encoding="utf-8")
    with pytest.raises(report.ReportError, match=r"predictions\.jsonl:1: missing key\(s\) id, image"):
        report.read_predictions(path)
    path.write_text("\n{oops\n", encoding="utf-8")
    with pytest.raises(report.ReportError, match=r"predictions\.jsonl:2: not valid JSON"):
        report.read_predictions(path)


def test_missing_screenshot_is_said_in_its_card(tmp_path):
    prompt, answer, prediction = SAMPLES["click_close"]
    row = {"model": "finetuned", "id": "x", "image": [str(tmp_path / "gone.png")], "prompt": prompt,
           "answer": answer, "prediction": prediction, "score": score_sample(prompt, answer, prediction)}
    page = report.render({"finetuned": aggregate([row["score"]])}, [row])
    assert f"image not found: {tmp_path / 'gone.png'}" in page


@pytest.fixture(scope="module")
def browser(built, tmp_path_factory):
    with page_in_chromium(built, tmp_path_factory.mktemp("chromium-profile")) as driver:
        yield driver


def visible_ids(driver) -> set[str]:
    from selenium.webdriver.common.by import By

    return {c.get_attribute("data-id") for c in driver.find_elements(By.CSS_SELECTOR, ".card") if c.is_displayed()}


def choose(driver, select_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, select_id)).select_by_value(value)


def test_headline_table_shows_the_metrics(browser, built):
    from selenium.webdriver.common.by import By

    def shown(key: str) -> str:
        element = browser.find_element(By.CSS_SELECTOR, f'#headline td[data-key="{key}"]')
        assert element.is_displayed()
        return element.text

    assert shown("finetuned.all.action_acc") == "75.0%"  # 3 of the 4 action answers have the right type
    assert shown("base.all.action_acc") == "0.0%"
    assert shown("finetuned.grounding.mean_iou") == "0.571"  # (1/7 + 1) / 2
    assert shown("finetuned.all.n") == "6"
    assert shown("finetuned.eval_loss") == "—"
    shot = built.parent / "report.png"
    assert browser.save_screenshot(str(shot))
    artifacts = ROOT / "tests" / "artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copy2(shot, artifacts / "report.png")


def test_annotated_screenshots_are_rendered(browser):
    widths = browser.execute_script("return [...document.querySelectorAll('img.shot')].map(i => i.naturalWidth)")
    assert len(widths) == len(SAMPLES) and all(width > 0 for width in widths)


def test_gallery_puts_wrong_answers_first_and_worst_first(browser):
    from selenium.webdriver.common.by import By

    order = [c.get_attribute("data-id") for c in browser.find_elements(By.CSS_SELECTOR, ".card")]
    assert set(order[: len(WRONG)]) == WRONG
    assert order[len(WRONG) - 1] == "box_partial"  # IoU 1/7 is wrong, but less so than no usable answer


def test_filters_hide_and_show_cards(browser):
    choose(browser, "filter-family", "grounding")
    assert visible_ids(browser) == GROUNDING_IDS
    choose(browser, "filter-result", "wrong")
    assert visible_ids(browser) == GROUNDING_IDS & WRONG
    choose(browser, "filter-family", "all")
    assert visible_ids(browser) == WRONG
    choose(browser, "filter-result", "correct")
    assert visible_ids(browser) == set(SAMPLES) - WRONG
    choose(browser, "filter-result", "all")
    assert visible_ids(browser) == set(SAMPLES)
