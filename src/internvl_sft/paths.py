"""Writing stage outputs so that an interrupted stage never leaves something that looks finished."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path


def staging_dir(target: Path) -> Path:
    """The temporary sibling a directory output is written into before it is published."""
    target = Path(target)
    return target.with_name(f".{target.name}.partial")


def publish(staging: Path, target: Path) -> None:
    """Replace `target` by the finished `staging` directory (the old one is removed only afterwards)."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, target)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temporary name and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_report(report: dict, text: str, out: Path) -> None:
    """Print a command's table and write its report as JSON."""
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(text)
    print(f"written to {out}")
