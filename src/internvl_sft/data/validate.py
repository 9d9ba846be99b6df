"""Checking a dataset once, before training: every annotation line of its meta files and every image they name.

`validate` collects all problems (file:line: reason) instead of stopping at the first. With the policy
`error` the caller reports them all and publishes nothing; with `skip` `drop_bad_lines` removes the bad
lines from the annotation files and updates the meta files' `length`. Image conversions (modes other than
RGB, EXIF rotation) are notes, not problems.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from internvl_sft.data.images import ImageLimits, ImageProblem, check_image
from internvl_sft.data.meta import DatasetSpec, Problem, Sample, load_meta, scan_annotation


@dataclasses.dataclass
class Validation:
    """What checking found: per-line problems, per-image conversion notes and what was checked."""

    samples: int = 0
    images: dict[Path, list[str] | ImageProblem] = dataclasses.field(default_factory=dict)
    problems: list[Problem] = dataclasses.field(default_factory=list)
    usable: dict[Path, int] = dataclasses.field(default_factory=dict)

    @property
    def notes(self) -> dict[Path, list[str]]:
        return {path: found for path, found in self.images.items() if isinstance(found, list) and found}

    @property
    def bad_samples(self) -> int:
        return len({(problem.source, problem.line) for problem in self.problems})


def rebase(path: Path, old: Path, new: Path) -> Path:
    """`path` moved from under `old` to under `new` (unchanged when it is not under `old`)."""
    return new / path.relative_to(old) if path.is_relative_to(old) else path


def dataset_specs(meta_path: Path, published: Path, staging: Path) -> list[DatasetSpec]:
    """The datasets of a meta file whose paths name the published folder, read from the staging folder."""
    return [
        dataclasses.replace(
            spec,
            root=rebase(spec.root, published, staging),
            annotation=rebase(spec.annotation, published, staging),
        )
        for spec in load_meta(meta_path)
    ]


def validate(specs: Iterable[DatasetSpec], limits: ImageLimits) -> Validation:
    """Check every line of every dataset and every image once (an image shared by samples is decoded once)."""
    found = Validation()
    for spec in specs:
        samples, problems = scan_annotation(spec)
        found.samples += len(samples) + len({problem.line for problem in problems})
        found.problems += problems
        found.usable[spec.annotation] = len(samples)
        for sample in tqdm(samples, desc=f"checking images of {spec.name}", unit="sample"):
            broken = image_problems(sample, limits, found.images)
            found.problems += broken
            found.usable[spec.annotation] -= bool(broken)
    found.problems.sort(key=lambda problem: (str(problem.source), problem.line))
    return found


def image_problems(sample: Sample, limits: ImageLimits, seen: dict[Path, list[str] | ImageProblem]) -> list[Problem]:
    problems = []
    for path in sample.images:
        if path not in seen:
            try:
                seen[path] = check_image(path, limits)
            except ImageProblem as problem:
                seen[path] = problem
        if isinstance(seen[path], ImageProblem):
            problems.append(Problem(sample.source, sample.line, str(seen[path])))
    return problems


def drop_bad_lines(specs_by_meta: dict[Path, list[DatasetSpec]], problems: list[Problem]) -> None:
    """Remove the lines with problems from the annotation files and rewrite each meta file's `length`."""
    bad: dict[Path, set[int]] = {}
    for problem in problems:
        bad.setdefault(problem.source, set()).add(problem.line)
    annotations = {spec.annotation for specs in specs_by_meta.values() for spec in specs}
    remaining = {annotation: keep_lines(annotation, bad.get(annotation, set())) for annotation in annotations}
    for meta_path, specs in specs_by_meta.items():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        for spec in specs:
            meta[spec.name]["length"] = remaining[spec.annotation]
        meta_path.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def keep_lines(annotation: Path, bad_lines: set[int]) -> int:
    """Rewrite `annotation` without `bad_lines` (numbered as the reader does); the number of samples left."""
    with annotation.open("rb") as handle:
        kept = [line for number, line in enumerate(handle, start=1) if number not in bad_lines]
    if bad_lines:
        annotation.write_bytes(b"".join(kept))
    return sum(1 for line in kept if line.strip())
