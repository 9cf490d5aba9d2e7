"""The worker's HTTP surface under hostile input (issue 13): every refusal a coded OpenAI-shaped JSON error, bodies
bounded in memory while they arrive, the caller's trace id carried through, and no plain-text 500.

Real worker processes with the real model, over real sockets.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import EMBED_ENV, GEMMA_ENV
from workers.ops import broker

from .payloads import DEEP_GRAMMAR

pytestmark = pytest.mark.model  # every test here starts a worker that loads the model

CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
HELLO = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}
MB = 1024 * 1024


def _j(obj: object) -> bytes:
    return json.dumps(obj).encode()


@dataclass(frozen=True)
class Case:
    """One hostile request and the error it must get: status, `error.type` and (when it names one) `error.param`."""

    name: str
    path: str
    body: bytes
    status: int
    type: str
    param: str | None = None
    method: str = "POST"


GENERATION = [
    Case("JSON nested 10^5 deep", CHAT, b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400,
         "invalid_json"),
    Case("lone surrogate", CHAT, b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', 400, "invalid_input"),
    Case("invalid UTF-8", COMPLETIONS, b'{"prompt": "caf\xe9"}', 400, "invalid_input"),
    Case("not JSON", CHAT, b"{nope", 400, "invalid_json"),
    Case("a list, not an object", CHAT, b"[1, 2]", 400, "invalid_request"),
    Case("messages as a string", CHAT, _j({"messages": "hello"}), 400, "invalid_request", "messages"),
    Case("messages as [1, 2]", CHAT, _j({"messages": [1, 2]}), 400, "invalid_request", "messages.0"),
    Case("messages as an object", CHAT, _j({"messages": {"role": "user", "content": "hi"}}), 400,
         "invalid_request", "messages"),
    Case("content as a number", CHAT, _j({"messages": [{"role": "user", "content": 5}]}), 400, "invalid_request",
         "messages.0.content"),
    Case("an image part", CHAT, _j({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), 400,
         "invalid_request", "messages.0.content.0.type"),
    Case("an unknown role", CHAT, _j({"messages": [{"role": "root", "content": "hi"}]}), 400, "invalid_request",
         "messages.0.role"),
    Case("prompt as a number", COMPLETIONS, _j({"prompt": 5}), 400, "invalid_request", "prompt"),
    Case("two prompts", COMPLETIONS, _j({"prompt": ["a", "b"]}), 400, "invalid_request", "prompt"),
    Case("max_tokens 10**12", COMPLETIONS, _j({"prompt": "hi", "max_tokens": 10**12}), 400, "context_overflow",
         "max_tokens"),
    Case("max_tokens 10**30 (chat)", CHAT, _j({**HELLO, "max_tokens": 10**30}), 400, "context_overflow",
         "max_tokens"),
    Case("max_tokens 10**12 (the seed's body)", COMPLETIONS, _j({"input": "hi", "params": {"max_tokens": 10**12}}),
         400, "context_overflow", "max_tokens"),
    Case("temperature as a word", CHAT, _j({**HELLO, "temperature": "hot"}), 400, "invalid_request", "temperature"),
    Case("100 stop strings", COMPLETIONS, _j({"prompt": "hi", "stop": ["x"] * 100}), 400, "invalid_request", "stop"),
    Case("a 600 KB req_id", COMPLETIONS, _j({"input": "hi", "req_id": "r" * 600_000}), 400, "invalid_request",
         "req_id"),
    Case("a 20,000-deep grammar inline", COMPLETIONS, _j({"prompt": "hi", "grammar": DEEP_GRAMMAR}), 400,
         "invalid_grammar", "grammar"),
    Case("a 20,000-deep grammar stored (text)", "/grammars/deep", DEEP_GRAMMAR.encode(), 400, "invalid_grammar",
         "gbnf", method="PUT"),
    Case("a 20,000-deep grammar stored (JSON)", "/grammars", _j({"name": "deep", "gbnf": DEEP_GRAMMAR}), 400,
         "invalid_grammar", "gbnf"),
    Case("a grammar that is not UTF-8", "/grammars/latin", b'root ::= "caf\xe9"', 400, "invalid_input", method="PUT"),
    Case("a grammar name as a number", "/grammars", _j({"name": 5, "gbnf": 'root ::= "a"'}), 400, "invalid_request",
         "name"),
    Case("embeddings on a generator", EMBEDDINGS, _j({"input": "hi"}), 404, "wrong_model_kind"),
    Case("no such route", "/v2/everything", b"", 404, "not_found", method="GET"),
    Case("a method the route lacks", CHAT, b"", 405, "method_not_allowed", method="GET"),
]

EMBEDDING = [
    Case("5,000 inputs", EMBEDDINGS, _j({"input": ["word"] * 5_000}), 400, "too_many_inputs", "input"),
    Case("input as [1, 2]", EMBEDDINGS, _j({"input": [1, 2]}), 400, "invalid_request", "input.0"),
    Case("input as a number", EMBEDDINGS, _j({"input": 7}), 400, "invalid_request", "input"),
    Case("a lone surrogate in input", EMBEDDINGS, b'{"input": ["\\udfff"]}', 400, "invalid_input"),
    Case("an unknown encoding_format", EMBEDDINGS, _j({"input": "hi", "encoding_format": "hex"}), 400,
         "invalid_request", "encoding_format"),
    Case("chat on an encoder", CHAT, _j(HELLO), 404, "wrong_model_kind"),
]


async def http_worker(start_worker: Callable[..., Any], env: Path = GEMMA_ENV, **overrides: Any) -> tuple[Any, str]:
    port = broker.free_port()
    w = await start_worker(env, HTTP_ADDR=f"127.0.0.1:{port}", **overrides)
    return w, f"http://127.0.0.1:{port}"


async def answers_table(base: str, table: list[Case]) -> list[str]:
    """Send every case; what went wrong, one line per case (an empty list: every case got its coded JSON error)."""
    wrong = []
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        for case in table:
            t0 = time.monotonic()
            r = await http.request(case.method, case.path, content=case.body)
            took = time.monotonic() - t0
            try:
                err = r.json()["error"]
            except (ValueError, KeyError, TypeError):
                wrong.append(f"{case.name}: {r.status_code} {r.headers.get('content-type')} {r.text[:120]!r}")
                continue
            got = (r.status_code, err.get("type"), err.get("param"))
            if got != (case.status, case.type, case.param) or err.get("code") != case.status or not err["message"]:
                wrong.append(f"{case.name}: got {got}, want {(case.status, case.type, case.param)}: {err}")
            elif took > 1.0:  # refused before anything is queued or run
                wrong.append(f"{case.name}: took {took:.2f} s")
    return wrong


async def test_hostile_generation_requests_get_coded_json_errors_and_the_worker_serves_on(start_worker):
    w, base = await http_worker(start_worker)
    assert await answers_table(base, GENERATION) == []
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        ok = await http.post(CHAT, json=HELLO)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    assert w.proc.poll() is None and "Traceback" not in w.output()
    w.terminate()
    with sqlite3.connect(w.db) as con:  # every refused OpenAI request is in the log, once
        rows = con.execute("SELECT count(*) FROM requests WHERE source = 'http' AND status = 'rejected'").fetchone()
    assert rows[0] == sum(1 for case in GENERATION if case.path.startswith("/v1/") and case.method == "POST")


async def test_hostile_embedding_requests_get_coded_json_errors_and_the_worker_serves_on(start_worker):
    w, base = await http_worker(start_worker, EMBED_ENV)
    assert await answers_table(base, EMBEDDING) == []
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        ok = await http.post(EMBEDDINGS, json={"input": ["word"] * 3})
        assert ok.status_code == 200 and len(ok.json()["data"]) == 3
    assert w.proc.poll() is None and "Traceback" not in w.output()


# --- bodies too large: refused while they arrive ------------------------------------------------------------------

def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


class Peak:
    """The highest RSS of a process from now on: the kernel's peak (reset through clear_refs) where it may be reset,
    else sampled every few milliseconds."""

    def __init__(self, pid: int) -> None:
        self.pid, self.sampled = pid, 0
        self.start = _status(pid)["VmRSS"]
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # proc(5): reset VmHWM to the current RSS
            self.kernel = _status(pid)["VmHWM"] <= self.start + MB
        except OSError:
            self.kernel = False
        self._task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            self.sampled = max(self.sampled, _status(self.pid)["VmRSS"])
            await asyncio.sleep(0.005)

    async def growth(self) -> int:
        self._task.cancel()
        peak = _status(self.pid)["VmHWM"] if self.kernel else self.sampled
        return max(peak, self.sampled) - self.start


async def _pieces(total: int, size: int = MB) -> AsyncIterator[bytes]:
    piece = b"x" * size
    for _ in range(total // size):
        yield piece
        await asyncio.sleep(0)


async def test_a_300_mb_body_is_refused_at_the_limit_without_growing_the_worker(start_worker):
    w, base = await http_worker(start_worker)
    size = 300 * MB
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        assert (await http.post(CHAT, json=HELLO)).status_code == 200  # the first request's allocations are done
        peak = Peak(w.proc.pid)
        replies = [
            await http.post(CHAT, content=_pieces(size)),  # chunked: no Content-Length
            await http.post(COMPLETIONS, content=_pieces(size), headers={"Content-Length": str(size)}),
            await http.put("/grammars/huge", content=_pieces(64 * MB)),
            await http.post("/grammars", content=_pieces(64 * MB), headers={"Content-Length": str(64 * MB)}),
        ]
        grew = await peak.growth()
        for r in replies:
            err = r.json()["error"]
            assert r.status_code == 413 and err["type"] == "payload_too_large", r.text
            assert "MAX_REQUEST_BYTES" in err["message"] and str(1024 * 1024) in err["message"]
        assert grew < 20 * MB, f"the worker grew by {grew / MB:.0f} MB"
        ok = await http.post(CHAT, json=HELLO)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None
    assert w.proc.poll() is None


# --- oversized headers --------------------------------------------------------------------------------------------

def _raw_request(port: int, head: bytes, write_timeout: float = 10) -> bytes:
    """Send a request head over a plain socket and read what comes back until the server closes; the server may stop
    reading a huge head half-way (then the send fails and the answer is read anyway)."""
    with socket.create_connection(("127.0.0.1", port), timeout=write_timeout) as sock:
        try:
            sock.sendall(head)
        except OSError:
            pass
        chunks = []
        try:
            while data := sock.recv(65536):
                chunks.append(data)
        except OSError:
            pass
    return b"".join(chunks)


async def test_oversized_headers_get_a_json_431_and_the_worker_serves_on(start_worker):
    w, base = await http_worker(start_worker)
    port = int(base.rsplit(":", 1)[1])
    # 20 KB of header and no end of the head: the server has read it all when it answers, so the answer is certain
    answer = await asyncio.to_thread(_raw_request, port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                     b"X-Junk: " + b"j" * 20_000 + b"\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ") and b"content-type: application/json" in head.lower(), answer[:300]
    assert json.loads(body)["error"]["type"] == "headers_too_large"
    # 7 MB: the server stops reading after 16 KB; whatever part of the answer arrives is the same 431
    answer = await asyncio.to_thread(_raw_request, port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                     b"X-Junk: " + b"j" * 7_000_000 + b"\r\nContent-Length: 2\r\n\r\n{}")
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:300]
    garbage = await asyncio.to_thread(_raw_request, port, b"NOT HTTP AT ALL\r\n\r\n")
    assert garbage.startswith(b"HTTP/1.1 400 ") and json.loads(garbage.partition(b"\r\n\r\n")[2])["error"][
        "type"] == "invalid_http", garbage
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        assert (await http.post(CHAT, json=HELLO)).status_code == 200
    assert w.proc.poll() is None


# --- the trace id -------------------------------------------------------------------------------------------------

async def _rows(db: Path, where: str, args: tuple[Any, ...], count: int, timeout: float = 10) -> list[tuple]:
    """Rows of the worker's log, once `count` of them are there (the log is written by a background task)."""
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(db) as con:
            rows = con.execute(f"SELECT trace_id, status, source FROM requests WHERE {where} ORDER BY id",
                               args).fetchall()
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.05)


async def test_the_callers_trace_id_comes_back_and_reaches_the_log_row(start_worker):
    w, base = await http_worker(start_worker)
    parent_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        plain = await http.post(CHAT, json=HELLO, headers={"Fleet-Trace-Id": "trace-http-1"})
        w3c = await http.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 2},
                              headers={"traceparent": f"00-{parent_trace}-00f067aa0ba902b7-01"})
        async with http.stream("POST", CHAT, json={**HELLO, "stream": True},
                               headers={"Fleet-Trace-Id": "trace-http-stream"}) as stream:
            events = [line async for line in stream.aiter_lines() if line.startswith("data: ")]
        refused = await http.post(CHAT, json={"messages": "x"}, headers={"Fleet-Trace-Id": "trace-http-bad"})
        missing = await http.get("/nowhere", headers={"Fleet-Trace-Id": "trace-http-404"})
        malformed = await http.post(CHAT, json=HELLO, headers={"traceparent": "00-xyz"})
        untraced = await http.post(CHAT, json=HELLO)
    assert plain.status_code == 200 and plain.headers["fleet-trace-id"] == "trace-http-1"
    assert w3c.status_code == 200 and w3c.headers["fleet-trace-id"] == parent_trace
    assert stream.status_code == 200 and stream.headers["fleet-trace-id"] == "trace-http-stream"
    assert events[-1] == "data: [DONE]"
    assert refused.status_code == 400 and refused.headers["fleet-trace-id"] == "trace-http-bad"
    assert missing.status_code == 404 and missing.headers["fleet-trace-id"] == "trace-http-404"
    assert malformed.status_code == 400 and malformed.json()["error"]["type"] == "invalid_header"
    assert "fleet-trace-id" not in untraced.headers
    traces = ("trace-http-1", parent_trace, "trace-http-stream")
    rows = await _rows(w.db, "trace_id IN (?, ?, ?)", traces, 3)
    assert sorted(rows) == sorted((t, "ok", "http") for t in traces)


# --- no plain-text 500 --------------------------------------------------------------------------------------------

async def test_an_unexpected_failure_is_a_json_500_logged_once_and_streams_end_with_an_error_event(start_worker):
    """A stored grammar file that is not UTF-8 (a disk or an older version wrote it) makes reading it raise where no
    route expects a failure: the plain GET, a completion that names it, and a stream that names it."""
    w, base = await http_worker(start_worker)
    stored = w.data_dir / "grammars"
    stored.mkdir(parents=True, exist_ok=True)
    (stored / "mangled.gbnf").write_bytes(b'root ::= "caf\xe9"')
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        read = await http.get("/grammars/mangled", headers={"Fleet-Trace-Id": "trace-500"})
        used = await http.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 2, "grammar": "mangled"},
                               headers={"Fleet-Trace-Id": "trace-500-run"})
        async with http.stream("POST", CHAT, json={**HELLO, "stream": True, "grammar": "mangled"}) as stream:
            events = [line async for line in stream.aiter_lines() if line.startswith("data: ")]
        ok = await http.post(CHAT, json=HELLO)
    for r in (read, used):
        assert r.status_code == 500 and r.headers["content-type"] == "application/json", r.text
        assert r.json()["error"] == {"message": "internal error: UnicodeDecodeError; see the worker log (make logs)",
                                     "type": "internal_error", "param": None, "code": 500}
    assert read.headers["fleet-trace-id"] == "trace-500"
    assert stream.status_code == 200 and events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["type"] == "internal_error"
    assert ok.status_code == 200 and w.proc.poll() is None
    assert await _rows(w.db, "trace_id = ?", ("trace-500-run",), 1) == [("trace-500-run", "failed", "http")]
    deadline = time.monotonic() + 10
    while (logged := _events(w.db, "http.error")) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert logged == 3
    assert w.output().count("Traceback") == 3, w.output()  # once per failure, not again by uvicorn


def _events(db: Path, code: str) -> int:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT COUNT(*) FROM events WHERE code = ?", (code,)).fetchone()[0]
