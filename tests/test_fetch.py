import hashlib
import http.server
import io
import threading
import zipfile
from functools import partial

import pytest

from internvl_sft.data.fetch import FetchError, copy_local, download, extract_zip


def make_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www. It ignores Range headers, so a resumed download
    exercises the fallback to a full download on a 200 answer."""
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_good_archive_downloads_and_extracts(server, tmp_path):
    root, url = server
    data = make_zip({"ui-dataset/annotations/a.jsonl": b"{}\n", "ui-dataset/images/x.png": b"png"})
    (root / "ui.zip").write_bytes(data)
    dest = download(f"{url}/ui.zip", tmp_path / "cache/ui.zip", hashlib.sha256(data).hexdigest())
    extract_zip(dest, tmp_path / "out")
    assert (tmp_path / "out/annotations/a.jsonl").read_bytes() == b"{}\n"
    assert (tmp_path / "out/images/x.png").exists()


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    root, url = server
    (root / "ui.zip").write_bytes(make_zip({"a.txt": b"a"}))
    with pytest.raises(FetchError, match="checksum mismatch"):
        download(f"{url}/ui.zip", tmp_path / "cache/ui.zip", "0" * 64)
    assert list((tmp_path / "cache").iterdir()) == []


def test_partial_download_is_completed(server, tmp_path):
    root, url = server
    data = make_zip({"a.txt": b"a" * 5000})
    (root / "ui.zip").write_bytes(data)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "ui.zip.partial").write_bytes(data[:100])
    dest = download(f"{url}/ui.zip", cache / "ui.zip", hashlib.sha256(data).hexdigest())
    assert dest.read_bytes() == data


def test_missing_checksum_is_refused(tmp_path):
    with pytest.raises(FetchError, match="sha256 is empty"):
        download("http://127.0.0.1:9/ui.zip", tmp_path / "ui.zip", "")


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt", "ok/../../evil.txt"])
def test_escaping_members_are_refused(tmp_path, name):
    archive = tmp_path / "bad.zip"
    archive.write_bytes(make_zip({"ok.txt": b"1", name: b"2"}))
    with pytest.raises(FetchError, match="escapes the target directory"):
        extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize(("name", "mode"), [("link", 0o120777), ("tty", 0o020666), ("disk", 0o060660),
                                           ("pipe", 0o010644)])
def test_link_and_device_members_are_refused(tmp_path, name, mode):
    archive = tmp_path / "special.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", b"1")
        info = zipfile.ZipInfo(name)
        info.external_attr = mode << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(FetchError, match=rf"member '{name}' is a link or special file"):
        extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_local_folder_with_a_link_is_refused(tmp_path):
    source = tmp_path / "dataset"
    (source / "images").mkdir(parents=True)
    (source / "images/a.png").symlink_to("/etc/passwd")
    with pytest.raises(FetchError, match=r"images/a\.png: links and special files are refused"):
        copy_local(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
