"""How well pre-trained tiny-base weights find the synthetic dataset's UI elements, asked in the base's own format.

    python -m internvl_sft.model.ui_probe src/internvl_sft/model/assets/tiny_grounded.safetensors --phrasing task

asks `指出…` for every named element of the first `--screens` validation screens of the synthetic dataset and
prints, per kind of element and over all, the mean point error (0-1000) against always answering the image
centre, and how often the answer lies nearest the asked element among the screen's named ones (against
chance). The phrasing names the element inside `<ref></ref>` (`ref`, as upstream), bare (`plain`) or with
the UI tasks' own words (`task`, e.g. `京东app图标`): a base that a LoRA fine-tune can build on finds them all.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

from internvl_sft.data import synthetic as ui
from internvl_sft.model import pretrain_tiny as pt
from internvl_sft.model.load import load_model
from internvl_sft.model.tiny import TinySizes

PHRASINGS = ("ref", "plain", "task")


def element_phrase(key: str, phrasing: str) -> str:
    label = ui.element_name(key)
    return {"ref": f"<ref>{label}</ref>", "plain": label, "task": ui.target_phrase(key)}[phrasing]


def screen_questions(seed: int, screens: int, phrasing: str) -> list[tuple[str, pt.PointQuestion]]:
    """(kind of element, question) for every named element of the first `screens` validation screens."""
    questions = []
    for index in range(screens):
        screen, _ = ui.render_screen(seed, "val", index)
        centres = pt.centres_of({key: element.box for key, element in screen.elements.items()}, screen.size)
        for key in sorted(screen.elements):
            question = pt.PointQuestion(screen.image, f"{ui.POINT_QUERY}{element_phrase(key, phrasing)}", key,
                                        centres)
            questions.append((key.partition(":")[0], question))
    return questions


def probe(weights: Path, seed: int, screens: int, phrasing: str, work: Path,
          sizes: TinySizes = pt.GROUNDED_SIZES) -> dict[str, dict[str, float]]:
    """`score_points` per kind of element and over `all` of them."""
    _, native = pt.build_start(work / "model", 0, sizes, init=weights)
    kinds, questions = zip(*screen_questions(seed, screens, phrasing), strict=True)
    answers = pt.ask_points(load_model(native), native, sizes, questions, work / "screens")
    scores = {"all": pt.score_points(answers, questions)}
    for kind in sorted(set(kinds)):
        picked = [number for number, other in enumerate(kinds) if other == kind]
        scores[kind] = pt.score_points([answers[n] for n in picked], [questions[n] for n in picked])
    return scores


def report(scores: dict[str, dict[str, float]]) -> str:
    lines = [f"{'element':14s} {'n':>4s} {'error':>7s} {'centre':>7s} {'nearest':>8s} {'chance':>7s}"]
    for kind, score in scores.items():
        lines.append(f"{kind:14s} {score['questions']:4d} {score['point_error']:7.1f} {score['centre_error']:7.1f} "
                     f"{score['picked']:8.0%} {score['by_chance']:7.0%}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", type=Path, help="pre-trained weights (python -m internvl_sft.model.pretrain_tiny)")
    parser.add_argument("--screens", type=int, default=20, help="validation screens to ask about (default: 20)")
    parser.add_argument("--seed", type=int, default=0, help="the synthetic dataset's seed (default: 0)")
    parser.add_argument("--phrasing", choices=PHRASINGS, default="ref", help="how an element is named (default: ref)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        scores = probe(args.weights, args.seed, args.screens, args.phrasing, Path(work))
    print(report(scores))


if __name__ == "__main__":
    main()
