"""Real dataset sources: an archive downloaded from a URL (checksum-verified, resumable) or a local zip/folder."""

from __future__ import annotations

import hashlib
import shutil
import stat
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A download or archive that cannot be used."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, sha256: str) -> Path:
    """Download `url` to `dest`, resuming a previous partial download, and verify its checksum.

    The file only gets its final name once the checksum matches; a mismatch deletes the partial file.
    """
    if not sha256:
        raise FetchError(f"params: data: sha256 is empty; refusing to use {url} without a checksum")
    if dest.exists() and sha256_of(dest) == sha256:
        return dest
    partial = dest.with_name(dest.name + ".partial")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fetch_with_resume(url, partial)
    actual = sha256_of(partial)
    if actual != sha256:
        partial.unlink()
        raise FetchError(f"{url}: checksum mismatch: expected sha256 {sha256}, got {actual}")
    partial.replace(dest)
    return dest


def fetch_with_resume(url: str, partial: Path) -> None:
    start = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        resumed = start > 0 and response.status == 206
        total = int(response.headers.get("Content-Length", 0)) + (start if resumed else 0)
        mode = "ab" if resumed else "wb"
        with partial.open(mode) as out, tqdm(
            total=total or None, initial=start if resumed else 0, unit="B", unit_scale=True, desc=partial.name
        ) as bar:
            for block in iter(lambda: response.read(CHUNK), b""):
                out.write(block)
                bar.update(len(block))


def safe_member_path(member: zipfile.ZipInfo, archive: Path) -> PurePosixPath:
    """Refuse absolute paths, `..`, links and special files inside an archive."""
    name = PurePosixPath(member.filename)
    kind = stat.S_IFMT(member.external_attr >> 16)
    if name.is_absolute() or ".." in name.parts or member.filename.startswith(("/", "\\")):
        raise FetchError(f"{archive}: member {member.filename!r} escapes the target directory")
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        raise FetchError(f"{archive}: member {member.filename!r} is a link or special file")
    return name


def extract_zip(archive: Path, target: Path) -> None:
    """Extract member by member after checking every name; a single top-level folder is stripped."""
    with zipfile.ZipFile(archive) as zf:
        members = [(m, safe_member_path(m, archive)) for m in zf.infolist()]
        tops = {path.parts[0] for _, path in members if path.parts}
        strip = len(tops) == 1 and all(len(p.parts) > 1 or m.is_dir() for m, p in members)
        for member, path in members:
            parts = path.parts[1:] if strip else path.parts
            if not parts or member.is_dir():
                continue
            out = target.joinpath(*parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, out.open("wb") as dst:
                shutil.copyfileobj(src, dst)


def check_plain_tree(folder: Path) -> None:
    """Refuse links and special files in a dataset folder, as in an archive: a link could name any file."""
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise FetchError(f"{path}: links and special files are refused in a dataset folder")


def copy_local(source: Path, target: Path) -> None:
    """Use a local zip archive or an already unpacked dataset folder."""
    if not source.exists():
        raise FetchError(f"params: data: local_path {source} does not exist")
    if source.is_dir():
        check_plain_tree(source)
        shutil.copytree(source, target, dirs_exist_ok=True)
    else:
        extract_zip(source, target)
