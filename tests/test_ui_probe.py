"""The UI probe of a pre-trained tiny base: its questions about the validation screens and its scores."""

import pytest

from internvl_sft.data import synthetic as ui
from internvl_sft.model import pretrain_tiny as pt
from internvl_sft.model import ui_probe
from internvl_sft.model.tiny import TinySizes, build_tiny_checkpoint

SMALL = TinySizes(vocab_size=400)


def test_each_phrasing_names_the_element_its_own_way():
    assert ui_probe.element_phrase("app:京东", "ref") == "<ref>京东</ref>"
    assert ui_probe.element_phrase("app:京东", "plain") == "京东"
    assert ui_probe.element_phrase("app:京东", "task") == ui.app_icon_phrase("京东")
    assert ui_probe.element_phrase("search_box", "task") == ui.SEARCH_BOX


def test_every_named_element_of_the_screens_is_asked_about_once():
    questions = ui_probe.screen_questions(0, 3, "task")
    screens = [ui.render_screen(0, "val", index)[0] for index in range(3)]
    assert len(questions) == sum(len(screen.elements) for screen in screens)
    for kind, question in questions:
        assert question.asked in question.centres and question.asked.startswith(kind)
        assert question.question.startswith(ui.POINT_QUERY) and "<ref>" not in question.question


def answer_with(where: str):
    def ask(model, native, sizes, questions, folder):
        points = [question.centres[question.asked] if where == "asked" else (500, 500) for question in questions]
        return [f"[{round(x)}, {round(y)}]" for x, y in points]
    return ask


@pytest.mark.parametrize("where", ["asked", "centre"])
def test_scores_of_known_answers(tmp_path, monkeypatch, where):
    build_tiny_checkpoint(tmp_path / "small", corpus=ui.GROUNDED_LEXICON, seed=0, sizes=SMALL)
    monkeypatch.setattr(pt, "ask_points", answer_with(where))
    scores = ui_probe.probe(tmp_path / "small/model.safetensors", 0, 3, "ref", tmp_path / "work", SMALL)
    assert scores["all"]["questions"] == sum(score["questions"] for kind, score in scores.items() if kind != "all")
    assert {"app", "nav"} <= set(scores)
    if where == "asked":
        assert scores["all"]["point_error"] < 1.0 and scores["all"]["picked"] == 1.0
    else:
        assert scores["all"]["point_error"] == pytest.approx(scores["all"]["centre_error"])
        assert scores["all"]["centre_error"] > 50 and scores["all"]["picked"] < 0.5
    assert "all" in ui_probe.report(scores).splitlines()[1]
