"""Reading and checking InternVL's data description: a meta JSON naming datasets, each a JSONL annotation file.

Meta file: `{"<name>": {"root": ..., "annotation": ..., "repeat_time": 1, "data_augment": false,
"max_dynamic_patch": 6, "length": 416}, ...}`; relative paths are taken from the working directory, as
upstream does. Annotation line: `{"id": ..., "image": "a.jpg" | ["a.jpg", ...], "conversations":
[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from internvl_sft.data.template import IMAGE_PLACEHOLDER, IMG_CONTEXT, IMG_END, IMG_START, check_roles

RESERVED_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT)
MAX_LISTED_PROBLEMS = 20


class DataError(ValueError):
    """Bad meta or annotation data; `problems` lists every problem found, each as `file:line: reason`."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        listed = "\n".join(f"  {problem}" for problem in self.problems[:MAX_LISTED_PROBLEMS])
        more = len(self.problems) - MAX_LISTED_PROBLEMS
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{len(self.problems)} data problem(s):\n{listed}{tail}")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a meta file."""

    name: str
    root: Path
    annotation: Path
    repeat_time: float
    data_augment: bool
    max_dynamic_patch: int | None
    length: int | None


@dataclasses.dataclass(frozen=True)
class Sample:
    """One annotation line, checked; `images` are resolved under the dataset root (empty for text-only).

    `max_dynamic_patch` and `data_augment` are the settings of the dataset the sample comes from.
    """

    source: Path
    line: int
    sample_id: str
    images: tuple[Path, ...]
    conversations: tuple[tuple[str, str], ...]
    max_dynamic_patch: int | None = None
    data_augment: bool = False

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclasses.dataclass(frozen=True)
class Problem:
    """Why one annotation line is not a usable sample."""

    source: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


def utf8_problem(raw: bytes) -> str | None:
    """Why `raw` is not UTF-8 text (None when it is)."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return utf8_reason(raw, err)
    return None


def utf8_reason(raw: bytes, err: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"


def is_text(value: Any) -> bool:
    """A string that can be written as UTF-8 (JSON escapes can produce lone surrogates, which cannot)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# key -> (required, type check, expected type in words)
META_KEYS: dict[str, tuple[bool, Callable[[Any], bool], str]] = {
    "root": (True, lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "annotation": (True, lambda v: isinstance(v, str) and v.endswith(".jsonl"), "a path ending in .jsonl"),
    "repeat_time": (True, lambda v: is_number(v) and v > 0, "a number > 0"),
    "data_augment": (False, lambda v: isinstance(v, bool), "true or false"),
    "max_dynamic_patch": (False, lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "length": (False, lambda v: is_int(v) and v >= 0, "an integer >= 0"),
}


def load_meta(meta_path: Path) -> list[DatasetSpec]:
    """Every dataset of a meta file, in file order; all problems of the file are reported at once."""
    meta_path = Path(meta_path)
    raw_bytes = meta_path.read_bytes()
    for number, line in enumerate(raw_bytes.split(b"\n"), start=1):
        if reason := utf8_problem(line):
            raise DataError([f"{meta_path}:{number}: {reason}"])
    text = raw_bytes.decode("utf-8")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError([f"{meta_path}:{err.lineno}: invalid JSON: {err.msg}"]) from err
    if not isinstance(raw, dict) or not raw:
        raise DataError([f"{meta_path}:1: expected an object mapping dataset names to settings"])
    problems: list[str] = []
    specs = [
        spec
        for name, entry in raw.items()
        if (spec := parse_spec(f"{meta_path}:{key_line(text, name)}", name, entry, problems))
    ]
    if problems:
        raise DataError(problems)
    return specs


def key_line(text: str, key: str) -> int:
    """1-based line where `"key":` first appears in a JSON text (1 when not found verbatim)."""
    match = re.search(re.escape(json.dumps(key, ensure_ascii=False)) + r"\s*:", text)
    return text.count("\n", 0, match.start()) + 1 if match else 1


def parse_spec(location: str, name: str, entry: Any, problems: list[str]) -> DatasetSpec | None:
    """The spec of one meta entry, or None after adding its problems to `problems`."""
    where = f"{location}: dataset {name!r}"
    if not isinstance(entry, dict):
        problems.append(f"{where}: expected an object, got {type(entry).__name__}")
        return None
    found = len(problems)
    for key in sorted(set(entry) - set(META_KEYS)):
        problems.append(f"{where}: unknown key {key!r} (known: {', '.join(META_KEYS)})")
    for key, (required, check, expected) in META_KEYS.items():
        if key not in entry:
            if required:
                problems.append(f"{where}: missing key {key!r}")
        elif not check(entry[key]):
            problems.append(f"{where}: {key!r} must be {expected}, got {entry[key]!r}")
    if len(problems) > found:
        return None
    return DatasetSpec(
        name=name,
        root=Path.cwd() / entry["root"],
        annotation=Path.cwd() / entry["annotation"],
        repeat_time=float(entry["repeat_time"]),
        data_augment=entry.get("data_augment", False),
        max_dynamic_patch=entry.get("max_dynamic_patch"),
        length=entry.get("length"),
    )


def read_samples(spec: DatasetSpec, seed: int) -> list[Sample]:
    """The checked samples of one dataset, repeated / subsampled by its repeat_time.

    The integer part of repeat_time repeats every sample; the fractional part adds that fraction of the
    samples (rounded down), drawn without replacement by a generator seeded with `seed` and the dataset name.
    """
    samples, problems = scan_annotation(spec)
    if problems:
        raise DataError([str(problem) for problem in problems])
    return repeat(samples, spec.repeat_time, random.Random(f"{seed}:{spec.name}"))


def scan_annotation(spec: DatasetSpec) -> tuple[list[Sample], list[Problem]]:
    """Every line of a dataset's annotation file, once: the valid samples and the problems of the others."""
    if not spec.annotation.is_file():
        raise DataError([f"{spec.annotation}: annotation file of dataset {spec.name!r} not found"])
    problems: list[Problem] = []
    samples: list[Sample] = []
    with spec.annotation.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                sample = parse_line(spec, number, raw, problems)
                if sample is not None:
                    samples.append(sample)
    return samples, problems


def repeat(samples: list[Sample], repeat_time: float, rng: random.Random) -> list[Sample]:
    copies = int(repeat_time)
    extra = int(len(samples) * (repeat_time - copies))
    chosen = sorted(rng.sample(range(len(samples)), extra))
    return samples * copies + [samples[index] for index in chosen]


def parse_line(spec: DatasetSpec, number: int, raw: bytes, problems: list[Problem]) -> Sample | None:
    """One annotation line as a Sample, or None after adding its problems to `problems`."""
    item, reasons = decode_line(raw)
    reasons = reasons or item_problems(spec, item)
    problems.extend(Problem(spec.annotation, number, reason) for reason in reasons)
    if reasons:
        return None
    images = image_list(item)
    conversations = [(turn["from"], turn["value"]) for turn in item["conversations"]]
    return Sample(
        source=spec.annotation,
        line=number,
        sample_id=str(item.get("id", f"{spec.annotation.name}:{number}")),
        images=tuple(spec.root / image for image in images),
        conversations=tuple(with_image_placeholder(conversations, len(images))),
        max_dynamic_patch=spec.max_dynamic_patch,
        data_augment=spec.data_augment,
    )


def decode_line(raw: bytes) -> tuple[Any, list[str]]:
    """The JSON value of an annotation line, or None and the reason why it has none."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, [utf8_reason(raw, err)]
    try:
        return json.loads(text.rstrip("\r\n")), []
    except json.JSONDecodeError as err:
        return None, [f"invalid JSON: {err.msg} (column {err.colno})"]
    except RecursionError:
        return None, ["invalid JSON: nested too deeply"]


def item_problems(spec: DatasetSpec, item: Any) -> list[str]:
    """Every reason why a decoded line is not a valid sample (empty when it is)."""
    if not isinstance(item, dict):
        return [f"expected a JSON object, got {type(item).__name__}"]
    if "video" in item:
        return ["video samples are not supported"]
    reasons = image_field_problems(item.get("image")) + conversation_problems(item.get("conversations"))
    if reasons:
        return reasons
    images = image_list(item)
    turns = [(turn["from"], turn["value"]) for turn in item["conversations"]]
    reasons += placeholder_problems(turns, len(images))
    reasons += [reason for image in images if (reason := image_path_problem(spec.root, image))]
    return reasons


def image_field_problems(image: Any) -> list[str]:
    if image is None or is_text(image):
        return []
    if isinstance(image, list) and all(is_text(path) and path for path in image):
        return []
    return ["'image' must be a path or a list of non-empty paths"]


def image_list(item: dict) -> list[str]:
    """Image paths of a sample: an empty `image` (string or list) means a text-only sample, as upstream."""
    image = item.get("image") or []
    return [image] if isinstance(image, str) else image


def conversation_problems(conversations: Any) -> list[str]:
    if conversations is None:
        return ["missing 'conversations'"]
    if not isinstance(conversations, list) or not conversations:
        return ["'conversations' must be a non-empty list"]
    for index, turn in enumerate(conversations, start=1):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            return [f"conversation turn {index} must be an object with string 'from' and 'value'"]
        if not (is_text(turn["from"]) and is_text(turn["value"])):
            return [f"conversation turn {index} holds a lone surrogate escape (not valid Unicode text)"]
    turns = [(turn["from"], turn["value"]) for turn in conversations]
    try:
        check_roles(turns)
    except ValueError as err:
        return [f"conversation {err} (roles alternate human/gpt from human; a leading system is allowed)"]
    reasons = [] if turns[-1][0] == "gpt" else ["conversation must end with a gpt answer"]
    reasons += [
        f"conversation turn {index} is an empty gpt answer"
        for index, (role, value) in enumerate(turns, start=1)
        if role == "gpt" and not value.strip()
    ]
    reasons += [
        f"conversation contains the reserved token {token}"
        for token in RESERVED_TOKENS
        if any(token in value for _, value in turns)
    ]
    return reasons


def placeholder_problems(turns: list[tuple[str, str]], images: int) -> list[str]:
    misplaced = [
        index for index, (role, value) in enumerate(turns, start=1) if role != "human" and IMAGE_PLACEHOLDER in value
    ]
    if misplaced:
        return [f"{IMAGE_PLACEHOLDER} placeholder outside a human turn (turn {misplaced[0]})"]
    placeholders = sum(value.count(IMAGE_PLACEHOLDER) for _, value in turns)
    if placeholders == images or (placeholders == 0 and images == 1):
        return []
    return [f"conversation has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {images} image(s)"]


def image_path_problem(root: Path, image: str) -> str | None:
    normalized = os.path.normpath(image)
    if os.path.isabs(normalized) or normalized.split(os.sep)[0] == os.pardir:
        return f"image path {image!r} escapes the dataset root"
    if not (root / normalized).is_file():
        return f"image file {root / normalized} not found"
    return None


def with_image_placeholder(turns: list[tuple[str, str]], images: int) -> list[tuple[str, str]]:
    """A single image without placeholder goes before the first human turn's text, as upstream does."""
    if images != 1 or any(IMAGE_PLACEHOLDER in value for _, value in turns):
        return turns
    first_human = next(index for index, (role, _) in enumerate(turns) if role == "human")
    role, value = turns[first_human]
    return turns[:first_human] + [(role, f"{IMAGE_PLACEHOLDER}\n{value}")] + turns[first_human + 1:]
