"""The pre-training of the embedded-default base: its grounding scenes, its training, its held-out metrics, given weights."""

import dataclasses
import os
import random
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from internvl_sft.data import synthetic as ui
from internvl_sft.metrics import parse_action
from internvl_sft.model import pretrain_tiny as pt
from internvl_sft.model.tiny import TinySizes, build_tiny_checkpoint
from internvl_sft.model.load import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SMALL = TinySizes(vocab_size=400)


def test_scenes_are_deterministic_and_targets_lie_inside_the_image():
    for index in range(20):
        first, again = pt.render_scene(3, index), pt.render_scene(3, index)
        assert first.image.tobytes() == again.image.tobytes() and first.targets == again.targets
        width, height = first.image.size
        assert first.targets and all(0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
                                     for x1, y1, x2, y2 in first.targets.values())


def test_alone_share_sets_how_many_scenes_hold_one_thing_alone():
    alone = [len(pt.render_scene(0, index, pt.SceneMix(alone_share=1.0)).targets) for index in range(20)]
    crowded = [len(pt.render_scene(0, index, pt.SceneMix(alone_share=0.0)).targets) for index in range(20)]
    assert alone == [1] * 20
    assert sum(count > 1 for count in crowded) >= 18
    assert pt.render_scene(0, 5, pt.SceneMix(alone_share=0.5)).image.tobytes() == pt.render_scene(0, 5).image.tobytes()


def test_a_scene_mix_bounds_the_named_things_and_distractors():
    two = pt.SceneMix(alone_share=0.0, max_things=2, distractors=0)
    pairs = [pt.render_scene(0, index, two) for index in range(20)]
    assert all(len(scene.targets) <= 2 for scene in pairs) and sum(len(scene.targets) == 2 for scene in pairs) >= 18
    crowded = [len(pt.render_scene(0, index, pt.SceneMix(alone_share=0.0)).targets) for index in range(20)]
    assert max(crowded) > 2


def test_scenes_are_not_the_ui_screens():
    sizes = {pt.render_scene(0, index).image.size for index in range(30)}
    assert sizes <= set(ui.PORTRAIT_SIZES + ui.OTHER_SIZES)
    screen, _ = ui.render_screen(0, "val", 0)
    assert all(pt.render_scene(0, index).image.tobytes() != screen.image.tobytes() for index in range(30))


def test_answers_use_grounding_formats_never_the_ui_action_format():
    rng = random.Random(0)
    for index in range(30):
        scene = pt.render_scene(0, index)
        conversation = pt.scene_conversation(scene, rng, 3)
        assert conversation[0][1].startswith("<image>\n")
        assert sum("<image>" in text for _, text in conversation) == 1
        for (role, question), (_, answer) in zip(conversation[::2], conversation[1::2]):
            assert role == "human" and "<ref>" in question
            assert answer.startswith(("<box>[[", "[")) and "操作" not in answer and parse_action(answer) is None
            label = question.split("<ref>")[1].split("</ref>")[0]
            x1, y1, x2, y2 = scene.targets[label]
            numbers = [int(n) for n in answer.strip("<box>[]/").replace("]", "").replace("[", "").split(", ")]
            width, height = scene.image.size
            if len(numbers) == 2:
                assert numbers == [round(1000 * (x1 + x2) / 2 / width), round(1000 * (y1 + y2) / 2 / height)]
            else:
                assert numbers == [round(1000 * x1 / width), round(1000 * y1 / height),
                                   round(1000 * x2 / width), round(1000 * y2 / height)]


def test_given_weights_replace_the_random_ones(tmp_path):
    random_dir, loaded_dir = tmp_path / "random", tmp_path / "loaded"
    build_tiny_checkpoint(random_dir, corpus=ui.LEXICON, seed=0, sizes=SMALL)
    weights = {key: value + 1 for key, value in load_file(str(random_dir / "model.safetensors")).items()}
    save_file(weights, str(tmp_path / "w.safetensors"))
    build_tiny_checkpoint(loaded_dir, corpus=ui.LEXICON, seed=0, sizes=SMALL, weights=tmp_path / "w.safetensors")
    loaded = load_file(str(loaded_dir / "model.safetensors"))
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert (loaded_dir / "tokenizer.json").read_bytes() == (random_dir / "tokenizer.json").read_bytes()


def test_weights_of_other_sizes_are_refused_with_the_reason(tmp_path):
    build_tiny_checkpoint(tmp_path / "small", corpus=ui.LEXICON, seed=0, sizes=SMALL)
    with pytest.raises(ValueError, match=r"does not fit the tiny sizes.*shape of .*expected"):
        build_tiny_checkpoint(tmp_path / "wide", corpus=ui.LEXICON, seed=0,
                              sizes=TinySizes(vocab_size=400, llm_hidden=128, llm_mlp=256),
                              weights=tmp_path / "small/model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"pretrained.tiny.weights: .*absent.safetensors does not exist"):
        build_tiny_checkpoint(tmp_path / "none", corpus=ui.LEXICON, seed=0, sizes=SMALL,
                              weights=tmp_path / "absent.safetensors")


def test_a_few_pretraining_steps_write_weights_the_builder_loads(tmp_path):
    out = tmp_path / "w.safetensors"
    settings = pt.PretrainSettings(steps=6, batch_size=4, learning_rate=3e-3, warmup_steps=1, log_every=1,
                                   save_every=3)
    pt.pretrain(out, settings, tmp_path / "work", SMALL)
    build_tiny_checkpoint(tmp_path / "up", corpus=ui.GROUNDED_LEXICON, seed=0, sizes=SMALL, weights=out)


def test_batches_drawn_by_workers_train_the_same_weights(tmp_path):
    settings = pt.PretrainSettings(steps=3, batch_size=2, learning_rate=3e-3, warmup_steps=1, log_every=1,
                                   save_every=3, eval_scenes=2)
    pt.pretrain(tmp_path / "inline.safetensors", settings, tmp_path / "a", SMALL)
    pt.pretrain(tmp_path / "workers.safetensors", dataclasses.replace(settings, workers=2), tmp_path / "b", SMALL)
    inline, workers = load_file(str(tmp_path / "inline.safetensors")), load_file(str(tmp_path / "workers.safetensors"))
    assert inline.keys() == workers.keys() and all(torch.equal(inline[k], workers[k]) for k in inline)


def test_a_scene_pool_repeats_its_scenes_in_order(tmp_path):
    _, native = pt.build_start(tmp_path, 0, SMALL)
    tokenizer = load_tokenizer(native)
    pooled = pt.SceneBatches(tokenizer, SMALL.template_name, SMALL.image_size, 16, 4, 0, 3, pt.SceneMix(), scene_pool=3)
    fresh = pt.SceneBatches(tokenizer, SMALL.template_name, SMALL.image_size, 16, 4, 0, 3, pt.SceneMix())
    for index in (0, 2):
        for key in ("input_ids", "pixel_values"):
            assert torch.equal(pooled.item(index + 3, pooled.mix)[key], fresh.item(index, fresh.mix)[key])
    assert not torch.equal(fresh.item(3, fresh.mix)["pixel_values"], fresh.item(0, fresh.mix)["pixel_values"])


def test_alone_steps_come_first_then_the_mix(tmp_path):
    _, native = pt.build_start(tmp_path, 0, SMALL)
    tokenizer = load_tokenizer(native)

    def batches(mix, alone_steps=0):
        return pt.SceneBatches(tokenizer, SMALL.template_name, SMALL.image_size, 16, 4, 0, 3, mix,
                               alone_steps=alone_steps)

    curriculum = batches(pt.SceneMix(alone_share=0.0), alone_steps=1)
    alone, crowded = batches(pt.SceneMix(alone_share=1.0)), batches(pt.SceneMix(alone_share=0.0))
    assert torch.equal(curriculum.batch(0, 2)["pixel_values"], alone.batch(0, 2)["pixel_values"])
    assert torch.equal(curriculum.batch(1, 2)["pixel_values"], crowded.batch(1, 2)["pixel_values"])
    assert not torch.equal(alone.batch(1, 2)["pixel_values"], crowded.batch(1, 2)["pixel_values"])


def test_points_are_parsed_only_in_the_answer_format():
    assert pt.parse_point("[12, 980]") == (12.0, 980.0)
    assert pt.parse_point(" [ 3 ,4 ] ") == (3.0, 4.0)
    assert pt.parse_point("<box>[[1, 2, 3, 4]]</box>") is None
    assert pt.parse_point("[12]") is None


def test_heldout_error_is_measured_against_the_true_centres(tmp_path):
    upstream, native = pt.build_start(tmp_path / "base", 0, SMALL)
    model = pt.load_model(native)
    first = pt.heldout_point_error(model, native, SMALL, seed=0, scenes=3, folder=tmp_path / "scenes")
    assert first == pt.heldout_point_error(model, native, SMALL, seed=0, scenes=3, folder=tmp_path / "scenes")
    assert 0.0 <= first["parsed"] <= 1.0 and first["centre_error"] > 0 and first["point_error"] >= 0
    scenes = [pt.render_scene(0, pt.HELDOUT_OFFSET + i) for i in range(3)]
    assert all(scene.targets for scene in scenes)
    assert model.training, "evaluation hands the model back in training mode"


class _Answers:
    """A stand-in for the Predictor that answers the asked thing's true centre, or always the image centre."""

    oracle = True

    def __init__(self, *args, **kwargs):
        pass

    def generate(self, queries):
        answers = []
        for query in queries:
            index = pt.HELDOUT_OFFSET + int(query.images[0].stem.removeprefix("picture_"))
            label = re.search("<ref>(.+)</ref>", query.conversations[0][1])[1]
            scene = pt.render_scene(0, index, CROWDED)
            x1, y1, x2, y2 = scene.targets[label]
            width, height = scene.image.size
            point = (round((x1 + x2) / 2 * 1000 / width), round((y1 + y2) / 2 * 1000 / height))
            answers.append(f"[{point[0]}, {point[1]}]" if self.oracle else "[500, 500]")
        return answers


CROWDED = pt.SceneMix(alone_share=0.0)


def test_heldout_metrics_of_known_answers(tmp_path, monkeypatch):
    upstream, native = pt.build_start(tmp_path / "base", 0, SMALL)
    model = pt.load_model(native)
    monkeypatch.setattr(pt, "Predictor", _Answers)
    right = pt.heldout_point_error(model, native, SMALL, seed=0, scenes=8, folder=tmp_path / "a", mix=CROWDED)
    assert right["point_error"] < 1.0 and right["parsed"] == 1.0
    assert right["crowded"] >= 6 and right["picked"] == 1.0 and 0.0 < right["by_chance"] <= 0.5
    monkeypatch.setattr(_Answers, "oracle", False)
    centre = pt.heldout_point_error(model, native, SMALL, seed=0, scenes=8, folder=tmp_path / "b", mix=CROWDED)
    assert centre["point_error"] == pytest.approx(centre["centre_error"]) and centre["centre_error"] > 50
    assert centre["picked"] < 1.0


def test_training_can_go_on_from_written_weights(tmp_path):
    settings = pt.PretrainSettings(steps=1, batch_size=2, warmup_steps=1, log_every=1, save_every=1, eval_scenes=1)
    pt.pretrain(tmp_path / "first.safetensors", settings, tmp_path / "a", SMALL)
    upstream, _ = pt.build_start(tmp_path / "b", 0, SMALL, init=tmp_path / "first.safetensors")
    written, start = load_file(str(tmp_path / "first.safetensors")), load_file(str(upstream / "model.safetensors"))
    assert written.keys() == start.keys() and all(torch.equal(written[k], start[k]) for k in written)
    random_start = load_file(str(pt.build_start(tmp_path / "c", 0, SMALL)[0] / "model.safetensors"))
    assert not all(torch.equal(written[k], random_start[k]) for k in written)


def test_screen_scenes_are_ui_screens_of_their_own_split_with_every_element_named():
    screens = pt.SceneMix(screen_share=1.0)
    dataset = {ui.render_screen(0, split, index)[0].image.tobytes()
               for split in ("train", "val") for index in range(20)}
    for index in range(20):
        scene = pt.render_scene(0, index, screens)
        screen, _ = ui.render_screen(0, pt.PRETRAIN_SPLIT, index)
        assert scene.image.tobytes() == screen.image.tobytes() and scene.image.tobytes() not in dataset
        assert sorted(scene.targets.values()) == sorted(element.box for element in screen.elements.values())
    assert ui.element_name("app:微信") == "微信" and ui.element_name("search_box") == ui.SEARCH_BOX
    half = [pt.render_scene(0, index, pt.SceneMix(screen_share=0.5)).image.tobytes() for index in range(40)]
    from_screens = sum(image == pt.render_scene(0, index, screens).image.tobytes() for index, image in enumerate(half))
    assert 10 <= from_screens <= 30


def test_plain_questions_name_the_thing_among_neutral_words_only():
    rng = random.Random(0)
    names = {thing.label for thing in pt.THINGS}
    neutral = re.compile(f"(?:{'|'.join(map(re.escape, pt.NEUTRAL_WORDS))})*")
    plain = 0
    for index in range(30):
        scene = pt.render_scene(0, index, pt.SceneMix(screen_share=0.5))
        conversation = pt.scene_conversation(scene, rng, 3, plain_share=1.0)
        for question, answer in zip(conversation[::2], conversation[1::2]):
            text = question[1].removeprefix("<image>\n")[len(ui.POINT_QUERY):]
            assert "<ref>" not in text
            named = [label for label in scene.targets if label in text]
            assert len(named) == 1, text
            before, _, after = text.partition(named[0])
            assert all(neutral.fullmatch(part) for part in (before, after)), text
            assert not any(name in before + after for name in names)
            plain += text != named[0]
    assert plain > 10
    assert pt.scene_conversation(pt.render_scene(0, 1), random.Random(3), 3) == pt.scene_conversation(
        pt.render_scene(0, 1), random.Random(3), 3, plain_share=0.0)


def test_a_run_stopped_early_keeps_the_schedule_of_all_its_steps(tmp_path, capsys):
    settings = pt.PretrainSettings(steps=8, stop_after=2, batch_size=2, warmup_steps=1, log_every=1,
                                   save_every=100, eval_scenes=1)
    pt.pretrain(tmp_path / "w.safetensors", settings, tmp_path / "a", SMALL)
    logged = capsys.readouterr().out
    assert "step 2/8" in logged and "step 3/8" not in logged and (tmp_path / "w.safetensors").exists()
    rate = float(re.search(r"step 2/8 loss \S+ lr (\S+)", logged)[1])
    assert rate == pytest.approx(settings.learning_rate * pt.learning_rate_factor(2, settings), rel=1e-2) and rate > 0


def test_the_base_rebuild_script_chains_seven_valid_runs(tmp_path):
    env = {**os.environ, "DRY_RUN": "1"}
    result = subprocess.run(["bash", str(ROOT / "shell/pretrain_tiny_base.sh"), str(tmp_path)], env=env,
                            capture_output=True, text=True, check=True)
    runs = [shlex.split(line) for line in result.stdout.splitlines()]
    assert len(runs) == 7 and not any(tmp_path.iterdir())
    previous = None
    for words in runs:
        assert words[:3] == ["python", "-m", "internvl_sft.model.pretrain_tiny"]
        args = pt.parse_args(words[3:])
        assert args.init == previous and Path(args.out).parent == tmp_path
        previous = Path(args.out)
    assert previous.name == "base.safetensors" and args.plain_share == 0.5 and args.screen_share == 1.0
