"""The demo on a tiny model: one question, the multi-turn chat, and base + adapter loading."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image, ImageChops, ImageDraw

from internvl_sft import demo
from internvl_sft.config import LoraConfig, TrainConfig
from internvl_sft.draw import PREDICTION
from internvl_sft.infer import Predictor
from internvl_sft.model.convert import upstream_to_native
from internvl_sft.model.load import load_model, prepare_for_training
from internvl_sft.model.tiny import TinySizes, build_tiny_checkpoint
from internvl_sft.stages import merge

CORPUS = ("操作：点击\n参数：[481, 472]", "请根据屏幕截图，执行任务：点击微信app图标") * 4
PARAMS = """
inputs:
  template: Hermes-2
  max_dynamic_patch: 2
eval:
  max_new_tokens: 6
merge:
  dtype: float32
"""
QUESTION = "请根据屏幕截图，执行任务：点击微信app图标"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny native model, a params file and a small screenshot."""
    root = tmp_path_factory.mktemp("demo")
    build_tiny_checkpoint(root / "upstream", corpus=CORPUS, seed=1, sizes=TinySizes(vocab_size=300))
    upstream_to_native(root / "upstream", root / "native")
    (root / "params.yaml").write_text(PARAMS, encoding="utf-8")
    screen = Image.new("RGB", (120, 240), (200, 200, 210))
    ImageDraw.Draw(screen).rectangle((20, 180, 100, 220), fill=(40, 160, 90))
    screen.save(root / "screen.png")
    return root


def run_demo(setup, *extra: str) -> None:
    demo.main(["--params", str(setup / "params.yaml"), "--image", str(setup / "screen.png"), *extra])


def test_one_question_writes_an_annotated_screenshot(setup, tmp_path, capsys):
    out = tmp_path / "shot.png"
    run_demo(setup, "--model", str(setup / "native"), "--prompt", QUESTION, "--out", str(out))
    printed = capsys.readouterr().out
    assert f"annotated screenshot: {out}" in printed
    with Image.open(setup / "screen.png") as original, Image.open(out) as drawn:
        assert drawn.size == original.size
        assert ImageChops.difference(original.convert("RGB"), drawn.convert("RGB")).getbbox() is not None


def test_parsed_click_is_drawn_where_the_answer_points(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Predictor, "generate", lambda self, queries: ["操作：点击\n参数：[250, 750]"])
    out = tmp_path / "click.png"
    run_demo(setup, "--model", str(setup / "native"), "--prompt", QUESTION, "--out", str(out))
    assert "parsed: 点击 [(250.0, 750.0)]" in capsys.readouterr().out
    with Image.open(out) as drawn:
        centre = drawn.convert("RGB").getpixel((30, 180))
    assert all(abs(a - b) <= 30 for a, b in zip(centre, PREDICTION.colour))


def test_chat_keeps_the_history_until_reset(setup, tmp_path, monkeypatch):
    asked, answered = [], []
    generate = Predictor.generate

    def recording(self, queries):
        asked.extend(queries)
        answered.extend(generate(self, queries))
        return answered[-len(queries):]

    monkeypatch.setattr(Predictor, "generate", recording)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n再说一遍\n/reset\n点击设置\n/quit\nnot asked\n"))
    run_demo(setup, "--model", str(setup / "native"), "--out", str(tmp_path / "chat.png"))
    turns = [query.conversations for query in asked]
    assert [len(t) for t in turns] == [1, 3, 1]
    assert turns[0][0] == ("human", f"<image>\n{QUESTION}")
    assert turns[1][:2] == (turns[0][0], ("gpt", answered[0]))
    assert turns[1][2] == ("human", "再说一遍")
    assert turns[2] == (("human", "<image>\n点击设置"),)
    assert (tmp_path / "chat.png").exists()


def answer_of(capsys) -> str:
    return capsys.readouterr().out.splitlines()[0]


def test_base_with_adapter_answers_like_the_merged_model(setup, tmp_path, capsys):
    recipe = TrainConfig(llm_lora=LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj")),
                         grad_checkpoint=False)
    model = prepare_for_training(load_model(setup / "native"), recipe)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    model.save_pretrained(tmp_path / "adapter")
    merge.main(["--params", str(setup / "params.yaml"), "--model", str(setup / "native"),
                "--adapter-dir", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")])
    capsys.readouterr()
    answers = {}
    for label, models in (("adapter", ["--base", str(setup / "native"), "--adapter", str(tmp_path / "adapter")]),
                          ("merged", ["--model", str(tmp_path / "merged")]),
                          ("base", ["--base", str(setup / "native")])):
        run_demo(setup, *models, "--prompt", QUESTION, "--out", str(tmp_path / f"{label}.png"))
        answers[label] = answer_of(capsys)
    assert answers["adapter"] == answers["merged"] != answers["base"]


def test_adapter_without_base_is_refused(setup):
    with pytest.raises(SystemExit):
        run_demo(setup, "--adapter", "somewhere", "--prompt", QUESTION)
