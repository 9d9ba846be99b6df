"""The README stays true to the tree: its section links resolve, the make targets it shows exist, and the
repository paths it names are there (or are outputs git ignores)."""

import itertools
import re
import subprocess

from tiny_project import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def heading_anchor(title: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def code_spans() -> list[str]:
    """Inline code and the lines of fenced blocks."""
    fenced = [line for block in FENCE.findall(README) for line in block.splitlines()[1:-1]]
    inline = re.findall(r"`([^`\n]+)`", FENCE.sub("", README))
    return fenced + inline


def expand_braces(path: str) -> list[str]:
    parts = re.split(r"\{([^}]*)\}", path)
    choices = [[part] if index % 2 == 0 else part.split(",") for index, part in enumerate(parts)]
    return ["".join(combination) for combination in itertools.product(*choices)]


def test_every_section_link_points_at_a_heading():
    headings = {heading_anchor(title) for title in re.findall(r"^#+ (.+)$", FENCE.sub("", README), re.MULTILINE)}
    links = set(re.findall(r"\]\(#([^)]+)\)", README))
    assert links, "the README links no section"
    assert links <= headings, f"links to missing sections: {sorted(links - headings)}"


def test_every_make_target_shown_exists():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.MULTILINE))
    shown = {match for span in code_spans() for match in re.findall(r"(?:^|[;&|] *)make ([a-z][a-z-]*)", span)}
    assert {"repro", "test", "train"} <= shown
    assert shown <= targets, f"make targets the Makefile lacks: {sorted(shown - targets)}"


def generated(path: str) -> bool:
    """A path git ignores: an output that a run or the tests create (tests/artifacts/...)."""
    return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0


def test_every_repository_path_named_exists():
    named = {path for span in code_spans()
             for path in re.findall(r"(?<![\w/.])((?:src|tests|shell|presets)/[\w./{},-]*[\w}])", span)}
    assert len(named) > 10
    missing = [path for pattern in sorted(named) for path in expand_braces(pattern)
               if not (ROOT / path).exists() and not generated(path)]
    assert not missing, f"paths named in the README that are not in the tree: {missing}"
