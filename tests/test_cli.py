"""nats-chat and nats-embed as a user runs them: subprocesses against a real fleet."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys

import pytest

from workers.ops import broker

from .conftest import EMBED_ENV

pytestmark = pytest.mark.model  # every test here starts a worker that loads the model

BIN = __import__("pathlib").Path(sys.executable).parent


def run(tool: str, *args: str, url: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "NATS_CHAT_MODEL": "gemma3-270m"}  # these tests start gemma, not the chat default
    return subprocess.run([str(BIN / tool), "-url", url, *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env)


async def cli(tool: str, *args: str, url: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(run, tool, *args, url=url, stdin=stdin)


async def test_one_shot_prints_the_answer_and_json_has_tokens(start_worker, nats_server):
    await start_worker()
    r = await cli("nats-chat", "-input", "The capital of France is", "--raw", "-max-tokens", "8",
                  "-temperature", "0", "-v", url=nats_server.url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "8 out" in r.stderr and "tok/s" in r.stderr
    assert "Traceback" not in r.stderr and "never retrieved" not in r.stderr  # the streamed path ends cleanly
    j = await cli("nats-chat", "--input", "Hi", "--max-tokens", "4", "--json", url=nats_server.url)
    assert j.returncode == 0 and json.loads(j.stdout)["tokens_out"] == 4


async def test_interactive_session_keeps_context_and_quits(start_worker, nats_server):
    w = await start_worker()
    script = "My name is Zorblax.\nWhat is my name?\n/quit\n"
    r = await cli("nats-chat", "-i", "-max-tokens", "12", "-temperature", "0", url=nats_server.url, stdin=script)
    assert r.returncode == 0, r.stderr
    await asyncio.sleep(1.0)
    with sqlite3.connect(w.db) as db:
        prompts = [row[0] for row in db.execute("SELECT formatted_input FROM requests ORDER BY id")]
    assert len(prompts) == 2
    assert "Zorblax" in prompts[1] and prompts[1].count("<start_of_turn>user") == 2  # turn one went along


async def test_list_shows_live_models(start_worker, nats_server):
    await start_worker()
    r = await cli("nats-chat", "--list", url=nats_server.url)
    assert r.returncode == 0 and "gemma3-270m" in r.stdout and "online" in r.stdout


async def test_nats_embed_three_inputs_and_stdin(start_worker, nats_server, tmp_path):
    await start_worker(EMBED_ENV)
    r = await cli("nats-embed", "-input", "one", "-input", "two", "-input", "three", url=nats_server.url)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("dim=640 ") for line in lines)
    s = await cli("nats-embed", "--output", str(tmp_path / "v.jsonl"), url=nats_server.url, stdin="alpha\nbeta\n")
    assert s.returncode == 0
    rows = [json.loads(x) for x in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert [r["input"] for r in rows] == ["alpha", "beta"] and len(rows[0]["embedding"]) == 640


async def test_nats_embed_output_npy_holds_the_workers_vectors_and_a_bad_suffix_is_one_line(start_worker, nats_server,
                                                                                             tmp_path):
    import numpy as np

    await start_worker(EMBED_ENV)
    args = ("-input", "first text", "-input", "second text")
    r = await cli("nats-embed", *args, "--output", str(tmp_path / "v.npy"), url=nats_server.url)
    assert r.returncode == 0 and r.stdout == "" and "wrote 2 vector(s) of 640" in r.stderr, r.stderr
    saved = np.load(tmp_path / "v.npy")
    j = await cli("nats-embed", *args, "--json", url=nats_server.url)
    reply = [d["embedding"] for d in sorted(json.loads(j.stdout)["data"], key=lambda d: d["index"])]
    assert saved.shape == (2, 640) and saved.dtype == np.float32
    assert np.allclose(saved, np.asarray(reply, dtype=np.float32), atol=1e-6)  # the worker's vectors, in order
    bad = await cli("nats-embed", *args, "--output", str(tmp_path / "v.csv"), url=nats_server.url)
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "must end in .npy or .jsonl, not .csv" in bad.stderr
    assert not (tmp_path / "v.csv").exists() and "Traceback" not in bad.stderr


async def test_errors_are_one_line_and_non_zero(start_worker, nats_server):
    dead = f"nats://127.0.0.1:{broker.free_port()}"
    r = await cli("nats-chat", "-input", "hi", url=dead)
    assert r.returncode == 2 and "no NATS server" in r.stderr and r.stderr.strip().count("\n") == 0
    r = await cli("nats-chat", "-input", "hi", "-m", "nobody-here", url=nats_server.url)
    assert r.returncode == 3 and "make start WORKER=nobody-here" in r.stderr
    await start_worker(WORKER_CONCURRENCY=1)
    busy = asyncio.create_task(cli("nats-chat", "-input", "Write a long story.", "-max-tokens", "200",
                                   "--no-stream", url=nats_server.url))
    await asyncio.sleep(1.0)
    r = await cli("nats-chat", "-input", "hi", "-timeout", "1", "--no-stream", url=nats_server.url)
    assert r.returncode == 4 and "within 1 s" in r.stderr and "queued" in r.stderr, r.stderr
    bad = await cli("nats-chat", "-input", "hi", "-max-tokens", "-3", url=nats_server.url)
    assert bad.returncode == 5 and "400" in bad.stderr
    assert (await busy).returncode == 0
