"""Grammars are bounded before llama.cpp sees them and compiled off the event loop (issue 13): the default limits
pass every grammar llama.cpp ships, a 20,000-deep one is a 400 while the worker serves on, a 650 KB one compiles
while health is still answered, and a full disk is a 507 that leaves no partial file.

Real worker processes with the real model, a real nats-server, real files.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nats
import pytest

from tests.conftest import ask
from workers import protocol as p
from workers.config import ROOT
from workers.ops import broker

from .payloads import DEEP_GRAMMAR

LLAMA_GRAMMARS = sorted((Path(__file__).parent / "data" / "llama_grammars").glob("*.gbnf"))
SHIPPED = sorted((ROOT / "data" / "grammars").glob("*.gbnf"))
GEMMA = "inference.request.gemma3-270m"


def big_grammar(size: int = 650_000) -> str:
    """An alternation of random words, `size` bytes: valid, and seconds of llama.cpp's compile time."""
    rng = random.Random(13)
    words, total = [], len("root ::= \n")
    while total < size:
        words.append("".join(rng.choice("abcdefghijklmnop") for _ in range(10)))
        total += len(words[-1]) + 5
    return "root ::= " + " | ".join(f'"{w}"' for w in words) + "\n"


def test_the_default_limits_pass_every_grammar_llama_cpp_ships():
    assert len(LLAMA_GRAMMARS) >= 8
    assert {f.name: p.gbnf_problem(f.read_text(), p.Limits()) for f in LLAMA_GRAMMARS + SHIPPED} == {
        f.name: None for f in LLAMA_GRAMMARS + SHIPPED}


_DISK_FULL = """
import asyncio, json, resource, signal, sys
from pathlib import Path
from workers.grammars import GrammarStore
from workers.protocol import BadRequest

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
store = GrammarStore(Path(sys.argv[1]), check=lambda _text: None)

async def main():
    out = {}
    try:
        await store.put("big", 'root ::= "' + "a" * 20_000 + '"')
    except BadRequest as e:
        out["big"] = [e.status, e.type, e.message]
    out["small"] = await store.put("small", 'root ::= "a"')
    print(json.dumps(out))

asyncio.run(main())
"""


def test_a_grammar_that_does_not_fit_on_the_disk_is_a_507_and_leaves_no_partial_file(tmp_path: Path):
    # RLIMIT_FSIZE makes the kernel refuse the write (EFBIG), as a full disk (ENOSPC) or a quota (EDQUOT) would.
    folder = tmp_path / "grammars"
    run = subprocess.run([sys.executable, "-c", _DISK_FULL, str(folder)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    status, type_, message = out["big"]
    assert (status, type_) == (507, "insufficient_storage") and "big" in message and "free space" in message
    assert out["small"] is False  # the store still works for what fits
    assert sorted(f.name for f in folder.iterdir()) == ["small.gbnf"]  # no temporary file, no truncated big.gbnf


async def _http_worker(start_worker, **env) -> tuple[object, str]:  # type: ignore[no-untyped-def]
    port = broker.free_port()
    w = await start_worker(HTTP_ADDR=f"127.0.0.1:{port}", **env)
    return w, f"http://127.0.0.1:{port}"


@pytest.mark.model
async def test_every_grammar_llama_cpp_ships_compiles_in_a_real_worker_and_a_deep_one_is_refused(start_worker, nc):
    w, base = await _http_worker(start_worker)
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        stored = {f.stem: (await http.put(f"/grammars/llama-{f.stem}", content=f.read_bytes())).status_code
                  for f in LLAMA_GRAMMARS}
        assert stored == {f.stem: 201 for f in LLAMA_GRAMMARS}  # compiled by llama.cpp in the worker, then kept
        deep = await http.put("/grammars/deep", content=DEEP_GRAMMAR.encode())
        assert deep.status_code == 400 and deep.json()["error"]["type"] == "invalid_grammar", deep.text
    inline = await ask(nc, GEMMA, {"input": "hi", "params": {"grammar": DEEP_GRAMMAR}}, timeout=10)
    assert inline["error"]["type"] == "invalid_grammar"
    answer = await ask(nc, GEMMA, {"input": "Name a list.", "params": {"grammar": "llama-json_arr", "max_tokens": 8,
                                                                      "temperature": 0}})
    assert not answer.get("error") and answer["text"].startswith("["), answer
    assert w.proc.poll() is None  # type: ignore[attr-defined]


@pytest.mark.model
async def test_a_650_kb_grammar_compiles_while_the_worker_still_answers_health(start_worker, nats_server):
    grammar = big_grammar()
    w, base = await _http_worker(start_worker, GRAMMAR_MAX_BYTES=1_000_000)
    watcher = await nats.connect(nats_server.url)
    slowest, answered = 0.0, 0

    async def health_until(done: asyncio.Future[httpx.Response]) -> None:
        nonlocal slowest, answered
        while not done.done():
            t0 = time.monotonic()
            await watcher.request(p.health_subject("gemma3-270m"), b"", timeout=5)
            slowest, answered = max(slowest, time.monotonic() - t0), answered + 1
            await asyncio.sleep(0.1)

    try:
        async with httpx.AsyncClient(base_url=base, timeout=120) as http:
            put = asyncio.ensure_future(http.put("/grammars/big", content=grammar.encode()))
            await health_until(put)
            r = await put
    finally:
        await watcher.close()
    assert r.status_code == 201, r.text  # within GRAMMAR_MAX_BYTES: compiled (seconds) and stored
    assert answered >= 3, "the compile was too quick to overlap with health requests"
    assert slowest < 1.0, f"a health reply took {slowest:.2f} s while the grammar compiled"
    assert w.proc.poll() is None  # type: ignore[attr-defined]
