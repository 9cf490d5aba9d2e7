"""Benchmark: requests through the gateway (the official `openai` client over HTTP) against the same requests sent
directly over NATS, in the same run, on a gemma3-270m and a minilm-l6-v2 worker.

Latency at concurrency 1: gateway and direct alternating request by request, so the difference of the medians is
what the gateway adds (HTTP + JSON + its NATS hop). It is judged on one-text embeddings (minilm-l6-v2, ~5 ms of
model time, little jitter) sent as plain HTTP (httpx, the client the openai library wraps), so the figure is the
gateway's own; the same through the openai library (its request building and response models cost a few ms in the
client) and 1-token completions (±5 ms of decode jitter between requests) are shown beside it, with the floor of
any HTTP hop here: GET /v1/models (no NATS) through the same client and server.
Throughput at concurrency 1 and 8 uses 16-token completions in ABBA order. Targets (issue 16): the gateway adds
≤ 2 ms at p50 and keeps ≥ 0.97× the direct throughput. Not a test: figures depend on the machine and its load.

    python scripts/bench_gateway.py [--pairs 60] [--n 32] [--tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import openai  # noqa: E402

from scripts.benchlib import local_worker  # noqa: E402
from workers import discovery  # noqa: E402
from workers.config import load_settings  # noqa: E402
from workers.modelfile import resolve  # noqa: E402
from workers.ops import broker  # noqa: E402

MODEL = "gemma3-270m"
SUBJECT = f"inference.request.{MODEL}"
EMBEDDER = "minilm-l6-v2"
MAX_ADDED_P50_MS = 2.0
MIN_THROUGHPUT_RATIO = 0.97


def start_gateway(nats_url: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = broker.free_port()
    env = dict(os.environ, NATS_URL=nats_url, GATEWAY_ADDR=f"127.0.0.1:{port}")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    ends = time.monotonic() + 60
    while time.monotonic() < ends and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    broker.stop(proc)
    raise SystemExit(f"the gateway did not get ready: {log.read_text()[-2000:]}")


async def batch(call: Callable[[int], Awaitable[None]], n: int, concurrency: int, start: int) -> float:
    """Requests start..start+n with at most `concurrency` at once; the wall seconds."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await call(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(start + i) for i in range(n)))
    return time.perf_counter() - t0


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    model = resolve(load_settings(MODEL))

    async with local_worker(MODEL, MODEL_PATH=str(model)) as w:
        with tempfile.TemporaryDirectory() as tmp:
            embedder = subprocess.Popen(
                [sys.executable, "-m", "workers", EMBEDDER], cwd=ROOT, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, env=dict(os.environ, NATS_URL=w.url, DATA_DIR=str(Path(tmp) / "data"),
                                                    HTTP_ADDR="", MODEL_PATH=str(resolve(load_settings(EMBEDDER)))))
            try:
                if not await discovery.wait_online(w.nc, EMBEDDER, pid=embedder.pid, timeout=120,
                                                   alive=lambda: embedder.poll() is None):
                    raise SystemExit(f"{EMBEDDER} did not come online")
            except BaseException:
                broker.stop(embedder)
                raise
            proc, url = start_gateway(w.url, Path(tmp) / "gateway.log")
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300,
                                        http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=64)))
            try:
                rows = await measure(args, w.nc, client)
            finally:
                await client.close()
                broker.stop(proc)
                broker.stop(embedder)
    report(args, *rows)


async def measure(args: argparse.Namespace, nc, client: openai.AsyncOpenAI):  # type: ignore[no-untyped-def]
    http = httpx.AsyncClient(timeout=300)

    def prompt(i: int) -> str:
        return f"Question {i}: name one fruit and one colour."

    async def direct(i: int, tokens: int) -> None:
        body = {"input": prompt(i), "raw": True, "params": {"max_tokens": tokens, "temperature": 0}}
        out = json.loads((await nc.request(SUBJECT, json.dumps(body).encode(), timeout=300)).data)
        assert out["tokens_out"] > 0, out

    async def gateway(i: int, tokens: int) -> None:
        out = await client.completions.create(model=MODEL, prompt=prompt(i), max_tokens=tokens, temperature=0)
        assert out.usage is not None and out.usage.completion_tokens > 0, out

    async def embed_direct(i: int, _: int) -> None:
        body = {"input": [prompt(i)]}
        out = json.loads((await nc.request(f"embedding.request.{EMBEDDER}", json.dumps(body).encode(),
                                           timeout=60)).data)
        assert out["data"], out

    async def embed_gateway(i: int, _: int) -> None:
        out = await client.embeddings.create(model=EMBEDDER, input=[prompt(i)])
        assert out.data, out

    async def embed_http(i: int, _: int) -> None:
        r = await http.post(f"{client.base_url}embeddings", json={"model": EMBEDDER, "input": [prompt(i)]})
        assert r.status_code == 200, r.text

    async def pairs(direct_call, gateway_call) -> tuple[list[float], list[float]]:  # type: ignore[no-untyped-def]
        for i in range(4):  # warm both paths
            await direct_call(i, 2)
            await gateway_call(i, 2)
        lat_d, lat_g = [], []
        for i in range(args.pairs):  # alternate, so drift in the machine's load favours neither
            order = ((direct_call, lat_d), (gateway_call, lat_g))
            for call, lat in order if i % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                await call(i, 1)
                lat.append((time.perf_counter() - t0) * 1000)
        return lat_d, lat_g

    floor = []  # an empty round trip through the same HTTP client and server: the part of "added" no route can save
    for _ in range(args.pairs):
        t0 = time.perf_counter()
        assert (await http.get(f"{client.base_url}models")).status_code == 200
        floor.append((time.perf_counter() - t0) * 1000)
    latency = {"embeddings, raw HTTP": await pairs(embed_direct, embed_http),
               "embeddings, openai": await pairs(embed_direct, embed_gateway),
               "completions, openai": await pairs(direct, gateway)}
    await http.aclose()
    latency["HTTP floor"] = ([0.0], floor)
    tput = []
    for conc in (1, 8):
        half = args.n // 2
        d = await batch(lambda i: direct(i, args.tokens), half, conc, 0)
        g = await batch(lambda i: gateway(i, args.tokens), half, conc, half)
        g += await batch(lambda i: gateway(i, args.tokens), half, conc, 2 * half)
        d += await batch(lambda i: direct(i, args.tokens), half, conc, 3 * half)
        tput.append((conc, 2 * half / d, 2 * half / g))
    return latency, tput


def report(args: argparse.Namespace, latency: dict[str, tuple[list[float], list[float]]],
           tput: list[tuple[int, float, float]]) -> None:
    print(f"\ngateway (openai client over HTTP) vs direct NATS, {os.cpu_count()} cores, {args.pairs} pairs alternating")
    print(f"{'latency':<22}{'direct p50 ms':>14}{'gateway p50 ms':>16}{'added ms':>10}")
    for i, (what, (lat_d, lat_g)) in enumerate(latency.items()):
        added = statistics.median(lat_g) - statistics.median(lat_d)
        verdict = [f"   target ≤ {MAX_ADDED_P50_MS:g} ms: {'PASS' if added <= MAX_ADDED_P50_MS else 'FAIL'}",
                   "   (+ the openai library's own time)", "   (decode jitter: shown, not judged)",
                   "   (GET /v1/models, no NATS: httpx + uvicorn + Starlette)"][i]
        print(f"{what:<22}{statistics.median(lat_d):>14.1f}{statistics.median(lat_g):>16.1f}{added:>+10.2f}{verdict}")
    print(f"{'concurrency':<13}{'direct req/s':>13}{'gateway req/s':>15}{'ratio':>8}   target ≥ {MIN_THROUGHPUT_RATIO}")
    for conc, d, g in tput:
        ok = g / d >= MIN_THROUGHPUT_RATIO
        print(f"{conc:<13}{d:>13.2f}{g:>15.2f}{g / d:>8.3f}   {'PASS' if ok else 'FAIL'}")
    print(f"({args.n} completions × {args.tokens} tokens at temperature 0 per row, ABBA order)")


if __name__ == "__main__":
    asyncio.run(main())
