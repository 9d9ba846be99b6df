"""Pre-training of the embedded-default base model: a tiny InternVL2 that already grounds.

Real InternVL2 checkpoints are pre-trained: they already find a named thing in a picture and say where it is,
and LoRA fine-tuning only teaches a new task format. A random-weight toy model does not, and LoRA alone
cannot teach it. This module gives the toy model the same starting point: it builds the tiny checkpoint
(`model/tiny.py`) at a size that can learn localisation, then trains every weight on its own grounding
data, upstream style (`<ref>label</ref>` -> `<box>[[x1, y1, x2, y2]]</box>`, coordinates in 0-1000).

The grounding data are of two kinds. Scenes of scattered shapes on plain or gradient backgrounds, drawn by a
generator of their own: the named things are the lexicon's apps, navigation tabs, list labels, search box and
search button, each with a look of its own, among unnamed distractors. And whole UI screens of
`data/synthetic.py` from a split of their own (`pretrain`, never the dataset's train or val screens) with every
element named, standing in for the screenshots a real base has seen before its fine-tuning. A question names
its thing upstream style, or (`--plain-share`) bare among neutral words, so that the name is found wherever it
stands. The answers never use the UI-task formats (`操作：…\\n参数：…`), so the base model scores nothing on them.

    python -m internvl_sft.model.pretrain_tiny --out src/internvl_sft/model/assets/tiny_grounded.safetensors

writes the pre-trained weights (upstream key names, fp32) that the `pretrained` stage loads when
`pretrained.tiny.weights` names them; a run is deterministic for a given seed, step count and thread count
(on a CPU; on a GPU up to its kernels), whatever the number of `--workers` drawing the batches.
`shell/pretrain_tiny_base.sh` chains the runs that made the committed file.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from internvl_sft.config import FastConfig, InputsConfig
from internvl_sft.data import synthetic as ui
from internvl_sft.data.dataset import TilingSettings, collate
from internvl_sft.data.template import encode_conversation, get_template
from internvl_sft.data.tiling import to_pixel_values
from internvl_sft.fast import install_fast_path
from internvl_sft.infer import Predictor, Query
from internvl_sft.model.convert import native_to_upstream_state_dict, read_json, upstream_to_native
from internvl_sft.model.load import load_model, load_tokenizer, read_sidecar
from internvl_sft.model.tiny import TinySizes, build_tiny_checkpoint

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]

# The size that learns localisation when every weight trains (a 64-wide, 2-layer model does not).
GROUNDED_SIZES = TinySizes(
    vision_hidden=128, vision_layers=2, vision_heads=4, vision_mlp=256,
    llm_hidden=128, llm_layers=4, llm_heads=4, llm_kv_heads=2, llm_mlp=256,
)
SCENE_SIZES = ui.PORTRAIT_SIZES + ui.OTHER_SIZES


# ---------------------------------------------------------------- scenes


@dataclasses.dataclass(frozen=True)
class Thing:
    """A named thing that can be drawn: `draw(draw, box, rng)` fills `box`, whose size `size(rng, u)` picks."""

    label: str
    kind: str
    colour: RGB
    shape: str = ""


THINGS: tuple[Thing, ...] = (
    *(Thing(app.name, "app", app.colour) for app in ui.APPS),
    *(Thing(tab.label, "nav", tab.colour, tab.shape) for tab in ui.NAV_TABS),
    *(Thing(row.label, "row", row.colour) for row in ui.ROW_LABELS),
    Thing(ui.SEARCH_BOX, "search_box", ui.SEARCH_BOX_FILL),
    Thing(ui.SEARCH_BUTTON, "search_button", ui.SEARCH_BUTTON_FILL),
)
DISTRACTOR_SHAPES = ("rect", "ellipse", "bar")
POINT_SHARE = 0.7  # centre-point questions; the others ask for the box


def thing_size(thing: Thing, width: int, rng: random.Random) -> tuple[int, int]:
    if thing.kind == "app":
        side = rng.randint(22, 46)
        return side, side
    if thing.kind == "nav":
        side = rng.randint(16, 30)
        return side, side
    if thing.kind == "row":
        return rng.randint(min(90, width - 16), width - 16), rng.randint(30, 50)
    if thing.kind == "search_box":
        return rng.randint(min(100, width - 16), min(200, width - 16)), rng.randint(26, 40)
    return rng.randint(40, 60), rng.randint(26, 40)


def draw_thing(draw: ImageDraw.ImageDraw, thing: Thing, box: Box, rng: random.Random) -> None:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    if thing.kind == "app":
        draw.rounded_rectangle((x1, y1, x2 - 1, y2 - 1), radius=w / 5, fill=thing.colour)
    elif thing.kind == "nav":
        ui.draw_nav_icon(draw, thing.shape, cx, cy, w / 2.3, thing.colour)
    elif thing.kind == "row":
        draw.rounded_rectangle((x1, y1, x2 - 1, y2 - 1), radius=6, fill=ui.blend(thing.colour, ui.WHITE, 0.72))
        r = h * 0.3
        draw.ellipse((x1 + 8, cy - r, x1 + 8 + 2 * r, cy + r), fill=thing.colour)
        ui.draw_text_bar(draw, x1 + 16 + 2 * r, y1 + h * 0.25, (w - 2 * r) * rng.uniform(0.2, 0.4), h * 0.15,
                     ui.TEXT_DARK)
    elif thing.kind == "search_box":
        draw.rounded_rectangle((x1, y1, x2 - 1, y2 - 1), radius=8, fill=ui.SEARCH_BOX_FILL,
                               outline=rng.choice((ui.SEARCH_BOX_BORDER, ui.SEARCH_BOX_FOCUS_BORDER)), width=2)
        ui.draw_magnifier(draw, x1 + 14, cy - 1, 5, ui.SEARCH_BOX_BORDER, 1.0)
    else:
        draw.rounded_rectangle((x1, y1, x2 - 1, y2 - 1), radius=8, fill=ui.SEARCH_BUTTON_FILL)
        ui.draw_magnifier(draw, cx, cy, 7, ui.WHITE, 1.0)


def draw_distractor(draw: ImageDraw.ImageDraw, box: Box, rng: random.Random) -> None:
    x1, y1, x2, y2 = box
    fill = rng.choice([colour for _, colour in ui.FILLER_ICONS] + [ui.random_colour(rng, 150, 240)])
    shape = rng.choice(DISTRACTOR_SHAPES)
    if shape == "rect":
        draw.rounded_rectangle((x1, y1, x2 - 1, y2 - 1), radius=(x2 - x1) / 5, fill=fill)
    elif shape == "ellipse":
        draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
    else:
        ui.draw_text_bar(draw, x1, y1, x2 - x1, max(4, (y2 - y1) // 3), fill)


def background(width: int, height: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (width, height), ui.random_colour(rng, 200, 250))
    if rng.random() < 0.5:
        draw = ImageDraw.Draw(image)
        top, bottom = ui.random_colour(rng, 40, 240), ui.random_colour(rng, 40, 240)
        for y in range(height):
            draw.line((0, y, width - 1, y), fill=ui.blend(top, bottom, y / max(height - 1, 1)))
    return image


def place(width: int, height: int, size: tuple[int, int], taken: list[Box], rng: random.Random) -> Box | None:
    w, h = size
    for _ in range(30):
        x1, y1 = rng.randint(4, width - w - 4), rng.randint(4, height - h - 4)
        box = (x1, y1, x1 + w, y1 + h)
        if all(box[2] + 3 <= t[0] or t[2] + 3 <= box[0] or box[3] + 3 <= t[1] or t[3] + 3 <= box[1] for t in taken):
            return box
    return None


@dataclasses.dataclass(frozen=True)
class Scene:
    image: Image.Image
    targets: dict[str, Box]  # label -> pixel box (x2, y2 exclusive)


@dataclasses.dataclass(frozen=True)
class SceneMix:
    """What the scenes hold: with probability `screen_share` a whole UI screen of `data/synthetic.py` from a
    split of its own (`PRETRAIN_SPLIT`, never the dataset's train or val screens), its elements named; else with
    probability `alone_share` one named thing alone on a plain background (where a thing is can be learned from
    these before which thing is which), else two to `max_things` named things and up to `distractors` unnamed
    shapes."""

    alone_share: float = 0.5
    max_things: int = 6
    distractors: int = 6
    screen_share: float = 0.0


PRETRAIN_SPLIT = "pretrain"  # the UI screens of the pre-training; the dataset's splits are "train" and "val"


def render_screen_scene(seed: int, index: int) -> Scene:
    screen, _ = ui.render_screen(seed, PRETRAIN_SPLIT, index)
    return Scene(screen.image, {ui.element_name(key): element.box for key, element in screen.elements.items()})


def render_scene(seed: int, index: int, mix: SceneMix = SceneMix()) -> Scene:
    """Scene `index` of the scenes `mix` describes."""
    if mix.screen_share and random.Random(f"tiny-grounding-screen:{seed}:{index}").random() < mix.screen_share:
        return render_screen_scene(seed, index)
    rng = random.Random(f"tiny-grounding:{seed}:{index}")
    width, height = rng.choice(SCENE_SIZES)
    alone = rng.random() < mix.alone_share
    image = Image.new("RGB", (width, height), ui.random_colour(rng, 200, 250)) if alone else background(
        width, height, rng)
    draw = ImageDraw.Draw(image)
    taken: list[Box] = []
    targets: dict[str, Box] = {}
    for thing in rng.sample(THINGS, 1 if alone else rng.randint(2, mix.max_things)):
        box = place(width, height, thing_size(thing, width, rng), taken, rng)
        if box is not None:
            draw_thing(draw, thing, box, rng)
            taken.append(box)
            targets[thing.label] = box
    for _ in range(0 if alone else rng.randint(0, mix.distractors)):
        side = rng.randint(14, 44)
        box = place(width, height, (side, rng.choice((side, side // 2 + 6))), taken, rng)
        if box is not None:
            draw_distractor(draw, box, rng)
            taken.append(box)
    if not targets:
        return render_scene(seed, index + 1_000_000_007, mix)
    return Scene(image, targets)


def normalised(value: float, extent: int) -> int:
    return round(1000 * value / extent)


def neutral_words() -> tuple[str, ...]:
    """Lexicon words that name no thing (search terms, quotes, commas): what a plain question wraps a name in."""
    names = [thing.label for thing in THINGS] + [ui.FIRST_RESULT]
    return tuple(word for word in (*ui.SEARCH_TERMS, "“", "”", "，", " ")
                 if not any(name in word for name in names))


NEUTRAL_WORDS = neutral_words()


def referring_phrase(label: str, rng: random.Random, plain_share: float) -> str:
    """`<ref>label</ref>` (upstream), or with probability `plain_share` the bare name among up to two neutral
    words either side, so that the name is found wherever it stands in a question."""
    if not (plain_share and rng.random() < plain_share):
        return f"<ref>{label}</ref>"
    before = "".join(rng.choices(NEUTRAL_WORDS, k=rng.randint(0, 2)))
    after = "".join(rng.choices(NEUTRAL_WORDS, k=rng.randint(0, 2)))
    return f"{before}{label}{after}"


def scene_conversation(scene: Scene, rng: random.Random, turns: int,
                       plain_share: float = 0.0) -> list[tuple[str, str]]:
    """Up to `turns` questions about distinct things; the first carries the image placeholder."""
    width, height = scene.image.size
    conversation: list[tuple[str, str]] = []
    labels = rng.sample(sorted(scene.targets), min(turns, len(scene.targets)))
    for n, label in enumerate(labels):
        x1, y1, x2, y2 = scene.targets[label]
        prefix = "<image>\n" if n == 0 else ""
        phrase = referring_phrase(label, rng, plain_share)
        if rng.random() >= POINT_SHARE:
            box = [normalised(x1, width), normalised(y1, height), normalised(x2, width), normalised(y2, height)]
            question, answer = f"{ui.BOX_QUERY}{phrase}", f"<box>[[{', '.join(map(str, box))}]]</box>"
        else:
            point = normalised((x1 + x2) / 2, width), normalised((y1 + y2) / 2, height)
            question, answer = f"{ui.POINT_QUERY}{phrase}", f"[{point[0]}, {point[1]}]"
        conversation += [("human", prefix + question), ("gpt", answer)]
    return conversation


# ---------------------------------------------------------------- training


def _option(default, help_text: str):
    """A settings field that is also a command-line option with this help."""
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    seed: int = _option(0, "seed of the random start, the scenes and the questions")
    steps: int = _option(3000, "optimizer steps; the learning rate decays to 0 at the last")
    stop_after: int = _option(0, "end after this many steps, the schedule still that of --steps (0: at --steps)")
    batch_size: int = _option(16, "scenes a step")
    learning_rate: float = _option(1e-3, "peak learning rate (AdamW)")
    warmup_steps: int = _option(100, "steps of linear warm-up")
    weight_decay: float = _option(0.01, "AdamW weight decay")
    turns: int = _option(3, "questions a scene at most, each about another named thing")
    alone_share: float = _option(0.5, "share of scenes with one thing alone on a plain background")
    max_things: int = _option(6, "named things in the other scenes: 2 to this many")
    distractors: int = _option(6, "unnamed shapes in the other scenes: 0 to this many")
    screen_share: float = _option(0.0, "share of scenes that are whole synthetic UI screens (of a split of their "
                                       "own, never the dataset's), every element named")
    plain_share: float = _option(0.0, "share of questions naming the thing without <ref> tags, among neutral words")
    scene_pool: int = _option(0, "cycle through this many fixed scenes (0: a new scene every time)")
    alone_steps: int = _option(0, "the first N steps draw one-thing scenes only, then the mix")
    log_every: int = _option(25, "print the mean training loss every N steps")
    save_every: int = _option(250, "write the weights every N steps (and at the end)")
    eval_every: int = _option(500, "held-out evaluation every N steps (0: only at the end)")
    eval_scenes: int = _option(40, "held-out scenes of an evaluation")
    workers: int = _option(0, "processes drawing batches ahead (0: in the training process)")
    bf16: bool = _option(False, "bf16 autocast on a GPU (fp32 otherwise)")

    def mix(self) -> SceneMix:
        return SceneMix(self.alone_share, self.max_things, self.distractors, self.screen_share)


class SceneBatches(torch.utils.data.Dataset):
    """Training batches of freshly drawn scenes: batch `step` always holds the same scenes, whichever process
    draws it, so data-loader workers keep a run deterministic. The first `alone_steps` batches hold one-thing
    scenes only, the later ones scenes of `mix`."""

    def __init__(self, tokenizer, template_name: str, tile_size: int, tokens_per_tile: int, max_tiles: int,
                 seed: int, turns: int, mix: SceneMix, scene_pool: int = 0, alone_steps: int = 0,
                 plain_share: float = 0.0):
        self.tokenizer = tokenizer
        self.template = get_template(template_name)
        self.tiling = TilingSettings(tile_size=tile_size, max_dynamic_patch=max_tiles)
        self.tokens_per_tile = tokens_per_tile
        self.seed = seed
        self.turns = turns
        self.mix = mix
        self.scene_pool = scene_pool
        self.alone_steps = alone_steps
        self.plain_share = plain_share

    def item(self, index: int, mix: SceneMix) -> dict:
        if self.scene_pool:
            index %= self.scene_pool
        scene = render_scene(self.seed, index, mix)
        rng = random.Random(f"tiny-grounding-questions:{self.seed}:{index}")
        conversation = scene_conversation(scene, rng, rng.randint(1, self.turns), self.plain_share)
        tiles = self.tiling.tiles(scene.image, 1)
        encoded = encode_conversation(self.tokenizer, self.template, conversation,
                                      [len(tiles) * self.tokens_per_tile])
        return {
            "input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
            "labels": torch.tensor(encoded.labels, dtype=torch.long),
            "pixel_values": to_pixel_values(tiles, self.tiling.tile_size),
            "num_tiles": len(tiles),
        }

    def batch(self, step: int, size: int) -> dict[str, torch.Tensor]:
        mix = SceneMix(alone_share=1.0) if step < self.alone_steps else self.mix
        items = [self.item(step * size + k, mix) for k in range(size)]
        return collate(items, self.tokenizer.pad_token_id)

    def loader(self, steps: int, size: int, workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
        """Batches 0..steps-1 in order, drawn by `workers` processes ahead of training."""
        return torch.utils.data.DataLoader(_Steps(self, size, steps), batch_size=None, num_workers=workers,
                                           pin_memory=pin_memory, prefetch_factor=4 if workers else None)


class _Steps(torch.utils.data.Dataset):
    def __init__(self, batches: SceneBatches, size: int, steps: int):
        self.batches, self.size, self.steps = batches, size, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        return self.batches.batch(step, self.size)


HELDOUT_OFFSET = 10_000_000  # scene indices of the held-out evaluation; training never reaches them


@dataclasses.dataclass(frozen=True)
class PointQuestion:
    """`question` about the named thing `asked` in `image`; `centres` holds every named thing's centre (0-1000)."""

    image: Image.Image
    question: str
    asked: str
    centres: dict[str, tuple[float, float]]


def centres_of(targets: dict[str, Box], size: tuple[int, int]) -> dict[str, tuple[float, float]]:
    width, height = size
    return {name: ((x1 + x2) / 2 * 1000 / width, (y1 + y2) / 2 * 1000 / height)
            for name, (x1, y1, x2, y2) in targets.items()}


def ask_points(model: torch.nn.Module, native: Path, sizes: TinySizes, questions: Sequence[PointQuestion],
               folder: Path) -> list[str]:
    """Greedy answers to `questions` (their pictures written to `folder`); the model is handed back in training
    mode."""
    tokenizer = load_tokenizer(native)
    inputs = InputsConfig(template=sizes.template_name, max_dynamic_patch=sizes.max_dynamic_patch)
    predictor = Predictor(model, tokenizer, inputs, read_sidecar(native), max_new_tokens=16)
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[int, Path] = {}  # several questions may ask about one picture: it is written once
    queries = []
    for question in questions:
        if id(question.image) not in paths:
            paths[id(question.image)] = folder / f"picture_{len(paths)}.png"
            question.image.save(paths[id(question.image)])
        queries.append(Query((paths[id(question.image)],), (("human", f"<image>\n{question.question}"),)))
    answers = [answer for start in range(0, len(queries), 8) for answer in predictor.generate(queries[start:start + 8])]
    model.train()
    return answers


def score_points(answers: Sequence[str], questions: Sequence[PointQuestion]) -> dict[str, float]:
    """The mean distance (0-1000 scale) between the answered and the asked thing's centre, against always
    answering the image centre; the share of answers that parse as a point; and, over the questions with several
    named things, how often the answer lies nearest the asked one (`picked`; `by_chance` if the answers were a
    named thing at random)."""
    errors, centre, parsed, picked, chance = [], [], 0, [], []
    for answer, question in zip(answers, questions, strict=True):
        point = parse_point(answer)
        parsed += point is not None
        distances = {name: math.dist(point or (500.0, 500.0), where) for name, where in question.centres.items()}
        errors.append(distances[question.asked])
        centre.append(math.dist((500.0, 500.0), question.centres[question.asked]))
        if len(question.centres) > 1:
            picked.append(min(distances, key=distances.get) == question.asked)
            chance.append(1 / len(question.centres))
    count, crowded = len(questions), max(len(picked), 1)
    return {"questions": count, "point_error": sum(errors) / count, "centre_error": sum(centre) / count,
            "parsed": parsed / count, "crowded": len(picked), "picked": sum(picked) / crowded,
            "by_chance": sum(chance) / crowded}


def heldout_point_error(model: torch.nn.Module, native: Path, sizes: TinySizes, seed: int, scenes: int,
                        folder: Path, mix: SceneMix = SceneMix()) -> dict[str, float]:
    """`score_points` of `指出<ref>…</ref>` about one named thing in each of `scenes` held-out scenes of `mix`."""
    questions = []
    for index in range(HELDOUT_OFFSET, HELDOUT_OFFSET + scenes):
        scene = render_scene(seed, index, mix)
        label = random.Random(f"tiny-grounding-heldout:{seed}:{index}").choice(sorted(scene.targets))
        questions.append(PointQuestion(scene.image, f"{ui.POINT_QUERY}<ref>{label}</ref>", label,
                                       centres_of(scene.targets, scene.image.size)))
    return score_points(ask_points(model, native, sizes, questions, folder), questions)


def heldout_summary(result: dict[str, float]) -> str:
    return (f"held-out point error {result['point_error']:.1f} (always the centre: {result['centre_error']:.1f}; "
            f"answers parsed {result['parsed']:.0%}); nearest the asked thing in {result['picked']:.0%} of "
            f"{result['crowded']} crowded scenes (by chance {result['by_chance']:.0%})")


def parse_point(answer: str) -> tuple[float, float] | None:
    numbers = re.fullmatch(r"\s*\[\s*(\d+)\s*,\s*(\d+)\s*\]\s*", answer)
    return (float(numbers[1]), float(numbers[2])) if numbers else None


def learning_rate_factor(step: int, settings: PretrainSettings) -> float:
    """Linear warm-up, then cosine decay to zero at the last step."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def save_upstream_weights(model: torch.nn.Module, llm_config: dict, path: Path) -> None:
    state = {key: value.detach().to(torch.float32).contiguous() for key, value in model.state_dict().items()}
    weights = native_to_upstream_state_dict(state, llm_config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    save_file(weights, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)


@torch.no_grad()
def centre_vision_inputs(model: torch.nn.Module) -> None:
    """Start from patch filters without a response to flat colour and position embeddings without a common part:
    the tokens of one image then differ by what and where they show from the first step, which makes
    localisation emerge sooner (measured on a one-dot task: about 500 of 2500 steps sooner)."""
    embeddings = model.model.vision_tower.embeddings
    weight = embeddings.patch_embeddings.projection.weight
    weight -= weight.mean(dim=(2, 3), keepdim=True)
    positions = embeddings.position_embeddings
    positions[:, 1:] -= positions[:, 1:].mean(dim=1, keepdim=True)


def build_start(folder: Path, seed: int, sizes: TinySizes = GROUNDED_SIZES,
                init: Path | None = None) -> tuple[Path, Path]:
    """The tiny checkpoint (upstream and native folders) that pre-training starts from: random weights, or those
    of `init` (a file this module wrote) to go on training them."""
    upstream, native = folder / "upstream", folder / "native"
    build_tiny_checkpoint(upstream, corpus=ui.GROUNDED_LEXICON, seed=seed, sizes=sizes, weights=init)
    upstream_to_native(upstream, native)
    return upstream, native


def pretrain(out: Path, settings: PretrainSettings, work: Path, sizes: TinySizes = GROUNDED_SIZES,
             init: Path | None = None) -> None:
    """Train every weight of a tiny checkpoint of `sizes` (random, or `init`'s weights) on grounding scenes; write
    the weights to `out` (upstream key names) every `save_every` steps and at the end."""
    torch.manual_seed(settings.seed)
    upstream, native = build_start(work, settings.seed, sizes, init)
    llm_config = read_json(upstream / "config.json")["llm_config"]
    model = load_model(native)
    if init is None:
        centre_vision_inputs(model)
    tokenizer = load_tokenizer(native)
    tokens_per_tile = int((sizes.patches_per_side * sizes.downsample_ratio) ** 2)
    batches = SceneBatches(tokenizer, sizes.template_name, sizes.image_size, tokens_per_tile,
                           sizes.max_dynamic_patch, settings.seed, settings.turns, settings.mix(),
                           settings.scene_pool, settings.alone_steps, settings.plain_share)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    model.config.text_config.use_cache = False
    install_fast_path(model, FastConfig(answer_logits_only=True, frozen_vision_no_grad=False))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, settings))
    start, recent = time.time(), []
    last = settings.stop_after or settings.steps
    loader = batches.loader(last, settings.batch_size, settings.workers, device.type == "cuda")
    for step, batch in enumerate(loader):
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16 and device.type == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        recent.append(loss.item())
        done = step + 1
        if done % settings.log_every == 0:
            print(f"step {done}/{settings.steps} loss {sum(recent) / len(recent):.4f} "
                  f"lr {schedule.get_last_lr()[0]:.2e} {time.time() - start:.0f}s", flush=True)
            recent = []
        if done % settings.save_every == 0 or done == last:
            save_upstream_weights(model, llm_config, out)
        if (settings.eval_every and done % settings.eval_every == 0) or done == last:
            result = heldout_point_error(model, native, sizes, settings.seed, settings.eval_scenes, work / "heldout",
                                         settings.mix())
            print(f"step {done}: {heldout_summary(result)}", flush=True)
    print(f"pre-trained weights written to {out} ({time.time() - start:.0f}s)", flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="safetensors file of the pre-trained weights")
    defaults = PretrainSettings()
    for field in dataclasses.fields(PretrainSettings):
        default = getattr(defaults, field.name)
        kind = {"action": argparse.BooleanOptionalAction} if isinstance(default, bool) else {"type": type(default)}
        parser.add_argument(f"--{field.name.replace('_', '-')}", default=default,
                            help=f"{field.metadata['help']} (default: {default})", **kind)
    parser.add_argument("--init", type=Path, help="go on training these weights (a file this module wrote)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fields = dataclasses.fields(PretrainSettings)
    settings = PretrainSettings(**{field.name: getattr(args, field.name) for field in fields})
    with tempfile.TemporaryDirectory() as work:
        pretrain(Path(args.out), settings, Path(work), init=args.init)


if __name__ == "__main__":
    main()
