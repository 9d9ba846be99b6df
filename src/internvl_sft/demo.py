"""Ask a model about one screenshot from the terminal and see its answer drawn on the screenshot.

    python -m internvl_sft.demo --image shot.png --prompt "请根据屏幕截图，执行任务：点击“设置”"
    python -m internvl_sft.demo --image shot.png     # multi-turn chat: /reset forgets the history, /quit ends
    python -m internvl_sft.demo --base pretrained/native --adapter work_dirs/adapter --image shot.png

The answer is parsed as an action (or a grounding box) and drawn on the screenshot, which is written to
--out (default `work_dirs/demo/<image stem>_annotated.png`). The screenshot is tiled with params.yaml
`inputs`, exactly as in evaluation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from internvl_sft.config import exit_on_config_error, load_params
from internvl_sft.data.images import load_image
from internvl_sft.data.meta import with_image_placeholder
from internvl_sft.draw import PREDICTION, Target, annotate
from internvl_sft.infer import Predictor, Query
from internvl_sft.metrics import Action, parse_action, parse_box
from internvl_sft.model.load import inference_device, load_model, load_tokenizer, read_sidecar, resolve_dtype
from internvl_sft.stages.merge import merge_adapter

DEFAULT_OUT_DIR = Path("work_dirs/demo")
NOTE_CHARS = 40  # an answer without an action is shown on the screenshot, shortened to this many characters
QUIT, RESET = "/quit", "/reset"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="its `inputs` section sets the tiling")
    parser.add_argument("--model", default="work_dirs/merged", help="merged model directory")
    parser.add_argument("--base", help="base model directory (with --adapter, instead of --model)")
    parser.add_argument("--adapter", help="LoRA adapter directory, merged into --base on loading")
    parser.add_argument("--image", required=True, help="the screenshot")
    parser.add_argument("--prompt", help="one question; without it the demo is an interactive chat")
    parser.add_argument("--out", help=f"annotated screenshot (default {DEFAULT_OUT_DIR}/<image stem>_annotated.png)")
    parser.add_argument("--max-new-tokens", type=int, help="default: params.yaml eval.max_new_tokens")
    args = parser.parse_args(argv)
    if args.adapter and not args.base:
        parser.error("--adapter needs --base, the model the adapter was trained on")
    return args


def load_predictor(args: argparse.Namespace) -> Predictor:
    """The merged model, the base model, or the base model with the adapter merged in."""
    params = load_params(args.params)
    model_dir = Path(args.base or args.model)
    dtype = resolve_dtype("auto")
    model = merge_adapter(model_dir, Path(args.adapter), dtype) if args.adapter else load_model(model_dir, dtype)
    max_new_tokens = args.max_new_tokens or params.eval.max_new_tokens
    return Predictor(model.to(inference_device()), load_tokenizer(model_dir), params.inputs, read_sidecar(model_dir),
                     max_new_tokens)


class Chat:
    """A conversation about one screenshot; the image placeholder opens the first question."""

    def __init__(self, predictor: Predictor, image: Path):
        self.predictor = predictor
        self.image = image
        self.history: tuple[tuple[str, str], ...] = ()

    def ask(self, question: str) -> str:
        turns = tuple(with_image_placeholder([*self.history, ("human", question)], images=1))
        answer = self.predictor.generate([Query(images=(self.image,), conversations=turns)])[0]
        self.history = (*turns, ("gpt", answer))
        return answer

    def reset(self) -> None:
        self.history = ()


def parse_answer(answer: str) -> Target | None:
    """The action of an actor/e2e answer, else the box of a grounding answer, else None."""
    return parse_action(answer) or parse_box(answer)


def describe(target: Target | None) -> str:
    if target is None:
        return "no action or box found"
    if isinstance(target, Action):
        return f"{target.kind} {target.text if target.text is not None else list(target.points)}"
    return f"box {list(target)}"


def annotated(image: Image.Image, answer: str) -> Image.Image:
    """The screenshot with the parsed answer drawn, or the answer itself as a caption when nothing parses."""
    target = parse_answer(answer)
    if target is not None:
        return annotate(image, [(target, PREDICTION)])
    first_line = (answer.strip().splitlines() or ["(empty answer)"])[0]
    return annotate(image, [], notes=[(first_line[:NOTE_CHARS], PREDICTION)])


def show(answer: str, image_path: Path, out: Path) -> None:
    print(answer)
    print(f"parsed: {describe(parse_answer(answer))}")
    out.parent.mkdir(parents=True, exist_ok=True)
    annotated(load_image(image_path), answer).save(out)
    print(f"annotated screenshot: {out}")


def interactive(chat: Chat, out: Path) -> None:
    print(f"chatting about {chat.image}; {RESET} forgets the conversation, {QUIT} (or end of input) ends it")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return
        if line == QUIT:
            return
        if line == RESET:
            chat.reset()
            print("(conversation forgotten)")
        elif line:
            show(chat.ask(line), chat.image, out)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    image = Path(args.image)
    if not image.is_file():
        raise SystemExit(f"{image}: no such image")
    out = Path(args.out) if args.out else DEFAULT_OUT_DIR / f"{image.stem}_annotated.png"
    chat = Chat(load_predictor(args), image)
    if args.prompt:
        show(chat.ask(args.prompt), image, out)
    else:
        interactive(chat, out)


if __name__ == "__main__":
    exit_on_config_error(main)
