"""Benchmark: the fleet worker against llama.cpp's own `llama-server`, same GGUF, same threads, in one run.

Completions (gemma3-270m, 64 tokens, temperature 0, a distinct prompt per request, the worker's prompt template
for everyone) at concurrency 1, 4 and 8:
  - direct llama-cpp-python, one context × all cores, `create_completion` (c=1 only: the ceiling of one call);
  - the worker over NATS, ENGINE=batched with 8 slots, and today's default (ENGINE=contexts, 2 contexts);
  - `llama-server --parallel 4` and `--parallel 8` (continuous batching, `-t` = cores, KV = CTX_SIZE per slot),
    `/completion` with `cache_prompt: false` and `ignore_eos: true`.
Embeddings (minilm-l6-v2), one text per request at concurrency 8: the worker over NATS (as bench_embed.py starts
it), direct `Llama.embed()` on the same texts grouped into calls of up to CTX_SIZE tokens, and
`llama-server --embedding --parallel 8`.

Every system is loaded first; then they take turns at each concurrency (A B … B A), so load that drifts on a
shared machine favours none of them. Prints one table (throughput counts the tokens each system really produced),
the ratios and the targets of issue 14 as PASS/FAIL lines; a FAIL is a finding, not an error (exit 0).
llama-server is skipped, with the reason, when its binary is missing: `python scripts/llama_server.py` builds it
once (or pass --build). Not a test: figures depend on the machine and on whatever else runs on it.

    python scripts/bench_peers.py [--n 8] [--embed-n 256] [--build] [--no-llama-server]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from scripts import llama_server  # noqa: E402
from scripts.bench_embed import texts as embed_texts  # noqa: E402
from scripts.benchlib import local_worker  # noqa: E402
from workers.batching import Scheduler  # noqa: E402
from workers.config import Settings, load_settings  # noqa: E402
from workers.connection import NATS  # noqa: E402
from workers.engine import POOLING  # noqa: E402
from workers.formats import format_prompt  # noqa: E402
from workers.formats.template import Template  # noqa: E402
from workers.modelfile import resolve  # noqa: E402
from workers.ops import broker  # noqa: E402
from workers.protocol import InferenceRequest, Params  # noqa: E402

GEN, EMB = "gemma3-270m", "minilm-l6-v2"
TOKENS, LEVELS = 64, (1, 4, 8)
CORES = os.cpu_count() or 1
BATCHED, TODAY, DIRECT = "worker batched 8 slots", "worker today (2 contexts)", "direct llama-cpp-python"
CEILING = "one context, 8 sequences, in process"  # the worker's Scheduler without NATS: what batching alone gives
DIRECT_EMBED = "direct Llama.embed (grouped)"
TOPICS = ["the ocean", "volcanoes", "the history of bread", "bicycles", "the moon", "honey bees", "glaciers",
          "the printing press", "coffee", "lighthouses", "trains", "the desert", "clocks", "owls", "rivers",
          "paper", "the violin", "salt", "bridges", "rainforests", "chess", "comets", "wool", "castles"]


@dataclass
class Point:
    """One row of the table: a system at one concurrency."""

    system: str
    c: int
    units: list[int]  # tokens (or texts) each request produced
    wall: float
    lat: list[float] = field(default_factory=list)  # seconds per request, as the caller saw it
    rss_mib: float | None = None
    ready_s: float | None = None

    @property
    def rate(self) -> float:
        return sum(self.units) / self.wall


class Prompts:
    """Distinct prompts that ask for more than 64 tokens, so every system (EOS or not) produces about 64."""

    def __init__(self) -> None:
        self.i = 0

    def take(self, n: int) -> list[str]:
        out = [f"Write a long, detailed essay about {TOPICS[(self.i + k) % len(TOPICS)]} (essay {self.i + k})."
               for k in range(n)]
        self.i += n
        return out


def rss_mib(pid: int) -> float | None:
    """Peak resident memory (VmHWM) of a process we started, in MiB; psutil's RSS where /proc has none."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import psutil  # type: ignore[import-untyped]
    except ImportError:
        return None
    return float(psutil.Process(pid).memory_info().rss) / 2**20


async def measure(system: str, call: Callable[[str], Awaitable[int]], items: list[str], c: int) -> Point:
    """Send every item through `call` with at most `c` in flight."""
    gate = asyncio.Semaphore(c)
    lat: list[float] = []

    async def one(item: str) -> int:
        async with gate:
            t0 = time.perf_counter()
            n = await call(item)
            lat.append(time.perf_counter() - t0)
            return n

    t0 = time.perf_counter()
    units = await asyncio.gather(*(one(x) for x in items))
    return Point(system, c, list(units), time.perf_counter() - t0, lat)


@dataclass
class System:
    """Something to measure: `run(items, c)` sends the items at concurrency c; the process it runs in, if ours."""

    name: str
    run: Callable[[list[str], int], Awaitable[Point]]
    levels: tuple[int, ...] = LEVELS
    pid: int | None = None
    ready_s: float | None = None


def per_request(name: str, call: Callable[[str], Awaitable[int]], levels: tuple[int, ...] = LEVELS,
                pid: int | None = None, ready_s: float | None = None) -> System:
    async def run(items: list[str], c: int) -> Point:
        return await measure(name, call, items, c)
    return System(name, run, levels, pid, ready_s)


async def compare(systems: list[System], take: Callable[[int], list[str]],
                  per_point: Callable[[int], int]) -> list[Point]:
    """Every system at every level, all loaded at once and measured in turns (A B … B A: each gets half the requests
    in either order), so drift in the shared machine's load does not favour the one measured first."""
    for s in systems:  # warm up: page cache, threads, first-call allocations
        warm = min(2, max(s.levels))
        await s.run(take(warm), warm)
    points: dict[tuple[str, int], Point] = {}
    for c in LEVELS:
        active = [s for s in systems if c in s.levels]
        half = max(c, per_point(c) // 2)  # at least one full wave at c
        for order in (active, active[::-1]):
            for s in order:
                p = await s.run(take(half), c)
                if (s.name, c) in points:
                    q = points[s.name, c]
                    q.units, q.wall, q.lat = q.units + p.units, q.wall + p.wall, q.lat + p.lat
                else:
                    points[s.name, c] = p
    for s in systems:  # memory and start-up belong to the system: shown on its last row
        last = points[s.name, max(s.levels)]
        last.rss_mib, last.ready_s = rss_mib(s.pid) if s.pid else None, s.ready_s
    return [points[s.name, c] for s in systems for c in s.levels if (s.name, c) in points]


@asynccontextmanager
async def worker(name: str, **env: str) -> AsyncIterator[tuple[NATS, int, float]]:
    """nats-server (temp store) plus worker `name`; yield (client, worker pid, seconds from spawn to online)."""
    async with local_worker(name, **env) as w:
        yield w.nc, w.pid, w.ready_s


@asynccontextmanager
async def llama_server_at(binary: Path, model: Path, *args: str) -> AsyncIterator[tuple[str, int, float]]:
    """llama-server on a free port; yield (base URL, pid, seconds from spawn to /health 200)."""
    port = broker.free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "llama-server.log"
        t0 = time.perf_counter()
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                                     "-t", str(CORES), "-tb", str(CORES), "--no-webui", "--cache-ram", "0", *args],
                                    stdout=out, stderr=out)
        try:
            async with httpx.AsyncClient(timeout=1) as http:
                while True:
                    if proc.poll() is not None:
                        raise RuntimeError(f"llama-server exited ({proc.returncode}): {log.read_text()[-2000:]}")
                    try:
                        if (await http.get(f"{base}/health")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.perf_counter() - t0 > 120:
                        raise RuntimeError(f"llama-server not ready after 120 s: {log.read_text()[-2000:]}")
                    await asyncio.sleep(0.05)
            yield base, proc.pid, time.perf_counter() - t0
        finally:
            broker.stop(proc, grace=30)


def nats_completion(nc: NATS) -> Callable[[str], Awaitable[int]]:
    async def call(text: str) -> int:
        body = {"input": text, "params": {"max_tokens": TOKENS, "temperature": 0}}
        out = json.loads((await nc.request(f"inference.request.{GEN}", json.dumps(body).encode(), timeout=600)).data)
        if out.get("error") or "tokens_out" not in out:
            raise RuntimeError(f"worker answered {out}")
        return int(out["tokens_out"])
    return call


def nats_embedding(nc: NATS) -> Callable[[str], Awaitable[int]]:
    async def call(text: str) -> int:
        out = json.loads((await nc.request(f"embedding.request.{EMB}", json.dumps({"input": [text]}).encode(),
                                           timeout=600)).data)
        if len(out.get("data", [])) != 1:
            raise RuntimeError(f"worker answered {out}")
        return 1
    return call


def http_call(http: httpx.AsyncClient, url: str, body: Callable[[str], dict[str, Any]],
              count: Callable[[dict[str, Any]], int]) -> Callable[[str], Awaitable[int]]:
    async def call(text: str) -> int:
        r = await http.post(url, json=body(text))
        if r.status_code != 200:
            raise RuntimeError(f"llama-server answered {r.status_code}: {r.text[:300]}")
        return count(r.json())
    return call


async def completions(args: argparse.Namespace, binary: Path | None) -> list[Point]:
    settings = load_settings(GEN)
    model, template = resolve(settings), Template.load(settings.template_path)

    def formatted(text: str) -> str:
        return format_prompt(InferenceRequest(input=text), template)

    print(f"completions: {model.name}, {TOKENS} tokens, temperature 0, {CORES} threads, {args.n} requests per "
          f"point ({2 * args.n} at c=8)", flush=True)
    from llama_cpp import Llama

    async with AsyncExitStack() as stack:
        llm = Llama(str(model), n_ctx=settings.ctx_size, n_threads=CORES, n_threads_batch=CORES, verbose=False)
        stack.callback(llm.close)

        async def direct(text: str) -> int:  # one context: one call at a time (measured at c=1 only)
            out = await asyncio.to_thread(llm.create_completion, formatted(text), max_tokens=TOKENS, temperature=0,
                                          stop=list(template.stop))
            return int(out["usage"]["completion_tokens"])  # type: ignore[index]

        systems = [per_request(DIRECT, direct, levels=(1,))]
        ceiling = Scheduler(model, slots=8, ctx_size=settings.ctx_size, threads=CORES)
        await ceiling.load()
        stack.callback(ceiling.close)

        async def in_process(text: str) -> int:
            out = await ceiling.complete(formatted(text), Params(max_tokens=TOKENS, temperature=0),
                                         stop=tuple(template.stop))
            return out.tokens_out

        systems.append(per_request(CEILING, in_process, levels=(8,)))
        for name, env in ((TODAY, {"ENGINE": "contexts", "WORKER_CONCURRENCY": "2"}),
                          (BATCHED, {"ENGINE": "batched", "WORKER_CONCURRENCY": "8", "MODEL_THREADS": str(CORES)})):
            nc, pid, ready = await stack.enter_async_context(worker(GEN, MODEL_PATH=str(model), **env))
            systems.append(per_request(name, nats_completion(nc), pid=pid, ready_s=ready))
            print(f"  {name}: online in {ready:.2f} s", flush=True)
        if binary is not None:
            http = await stack.enter_async_context(httpx.AsyncClient(timeout=600, limits=httpx.Limits(
                max_connections=32)))
            for slots in (4, 8):
                name = f"llama-server -np {slots}"
                base, pid, ready = await stack.enter_async_context(llama_server_at(
                    binary, model, "--parallel", str(slots), "--cont-batching", "-c", str(settings.ctx_size * slots)))
                call = http_call(http, f"{base}/completion",
                                 lambda t: {"prompt": formatted(t), "n_predict": TOKENS, "temperature": 0,
                                            "cache_prompt": False, "ignore_eos": True, "stop": list(template.stop)},
                                 lambda out: int(out["tokens_predicted"]))
                systems.append(per_request(name, call, pid=pid, ready_s=ready))
                print(f"  {name}: ready in {ready:.2f} s", flush=True)
        prompts = Prompts()
        return await compare(systems, prompts.take, lambda c: args.n if c < 8 else 2 * args.n)


def grouped_embed(model: Path, settings: Settings) -> tuple[Callable[[list[str], int], Awaitable[Point]], Any]:
    """Llama.embed on groups of up to CTX_SIZE tokens (bench_embed.py's best grouping), one context × all cores."""
    from llama_cpp import Llama

    ctx = settings.ctx_size
    llm = Llama(str(model), embedding=True, pooling_type=POOLING[settings.pooling], n_ctx=ctx, n_batch=ctx,
                n_ubatch=ctx, n_threads=CORES, n_threads_batch=CORES, verbose=False)

    def embed_all(items: list[str]) -> float:
        groups: list[list[str]] = [[]]
        size = 0
        for text in items:
            n = len(llm.tokenize(text.encode()))
            if groups[-1] and size + n > ctx:
                groups.append([])
                size = 0
            groups[-1].append(text)
            size += n
        t0 = time.perf_counter()
        for g in groups:
            llm.embed(g, normalize=settings.embed_normalize)
        return time.perf_counter() - t0

    async def run(items: list[str], c: int) -> Point:
        return Point(DIRECT_EMBED, 0, [1] * len(items), await asyncio.to_thread(embed_all, items))
    return run, llm


async def embeddings(args: argparse.Namespace, binary: Path | None) -> list[Point]:
    settings = load_settings(EMB)
    model = resolve(settings)
    items = iter(embed_texts(3 * args.embed_n + 16))  # every request a text not sent before
    print(f"embeddings: {model.name}, {args.embed_n} texts, one per request, 8 in flight", flush=True)
    async with AsyncExitStack() as stack:
        run, llm = grouped_embed(model, settings)
        stack.callback(llm.close)
        systems = [System(DIRECT_EMBED, run, (8,))]
        nc, pid, ready = await stack.enter_async_context(worker(EMB, MODEL_PATH=str(model)))
        systems.append(per_request(f"worker embed (groups of {settings.embed_batch_max})", nats_embedding(nc), (8,),
                                   pid, ready))
        if binary is not None:
            http = await stack.enter_async_context(httpx.AsyncClient(timeout=600, limits=httpx.Limits(
                max_connections=32)))
            base, pid, ready = await stack.enter_async_context(llama_server_at(
                binary, model, "--embedding", "--pooling", settings.pooling, "--parallel", "8",
                "-c", str(settings.ctx_size * 8), "-b", str(settings.ctx_size), "-ub", str(settings.ctx_size)))
            call = http_call(http, f"{base}/v1/embeddings", lambda t: {"input": t}, lambda out: len(out["data"]))
            systems.append(per_request("llama-server --embedding -np 8", call, (8,), pid, ready))
        rows = await compare(systems, lambda n: [next(items) for _ in range(n)], lambda c: args.embed_n)
    for p in rows:
        p.c = 0 if p.system == DIRECT_EMBED else p.c
    return rows


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def table(rows: list[Point]) -> None:
    print(f"\n{'system':<34}{'c':>3}{'req':>5}{'units/req':>10}{'rate/s':>9}{'p50 ms':>9}{'p95 ms':>9}"
          f"{'RSS MiB':>9}{'ready s':>9}")
    for r in rows:
        c = str(r.c) if r.c else "-"
        lat = (f"{statistics.median(r.lat) * 1000:>9.0f}{pct(r.lat, 95) * 1000:>9.0f}" if r.lat else f"{'-':>9}" * 2)
        rss = f"{r.rss_mib:>9.0f}" if r.rss_mib is not None else f"{'-':>9}"
        ready = f"{r.ready_s:>9.2f}" if r.ready_s is not None else f"{'-':>9}"
        print(f"{r.system:<34}{c:>3}{len(r.units):>5}{sum(r.units) / len(r.units):>10.1f}{r.rate:>9.1f}{lat}{rss}"
              f"{ready}")
    print("rate/s: tokens/s for completions, texts/s for embeddings; RSS: peak (VmHWM) of the serving process; "
          "ready: spawn to first online health reply (worker) or /health 200 (llama-server).")


def report(gen: list[Point], emb: list[Point], skipped: str) -> None:
    """The ratios, then issue 14's targets: PASS / FAIL with the figures, SKIP when a side was not measured."""
    def at(rows: list[Point], prefix: str, c: int | None = None) -> Point | None:
        return next((p for p in rows if p.system.startswith(prefix) and (c is None or p.c == c)), None)

    def best_server(c: int) -> Point | None:
        points = [p for p in gen if p.system.startswith("llama-server") and p.c == c]
        return max(points, key=lambda p: p.rate) if points else None

    checks: list[tuple[str, bool | None, str]] = []  # (target, met or None when not measured, the figures)
    print("\nratios (throughput)")
    for c in LEVELS:
        b, s = at(gen, BATCHED, c), best_server(c)
        if b and s:
            print(f"  worker batched / best llama-server ({s.system}) at c={c}: {b.rate / s.rate:.2f}")
        checks.append((f"worker batched ≥ 1.0× best llama-server at c={c}",
                       b.rate >= s.rate if b and s else None, f"{b.rate / s.rate:.2f}×" if b and s else ""))
    for c, target in ((1, 0.0), (4, 1.3), (8, 1.7)):
        b, t = at(gen, BATCHED, c), at(gen, TODAY, c)
        if b and t:
            print(f"  worker batched / worker today at c={c}: {b.rate / t.rate:.2f}")
            if target:
                checks.append((f"worker batched ≥ {target}× worker today at c={c}", b.rate / t.rate >= target,
                               f"{b.rate / t.rate:.2f}×"))
    b8, s8, top = at(gen, BATCHED, 8), at(gen, "llama-server -np 8", 8), at(gen, CEILING, 8)
    if b8 and top:
        print(f"  worker batched / one context in process at c=8: {b8.rate / top.rate:.2f}")
        checks.append(("worker batched ≥ 0.9× the one-context ceiling at c=8", b8.rate >= 0.9 * top.rate,
                       f"{b8.rate / top.rate:.2f}×"))
    if b8 and b8.rss_mib is not None:
        checks.append(("RSS of the 8-slot worker ≤ llama-server -np 8 + 100 MiB",
                       b8.rss_mib <= s8.rss_mib + 100 if s8 and s8.rss_mib else None,
                       f"{b8.rss_mib:.0f} vs {s8.rss_mib:.0f} + 100 MiB" if s8 and s8.rss_mib else ""))
    for p in gen:
        if p.ready_s is not None and p.system.startswith("worker"):
            checks.append((f"start to ready ≤ 2 s, {p.system}", p.ready_s <= 2.0, f"{p.ready_s:.2f} s"))
    w, d, s = at(emb, "worker"), at(emb, DIRECT_EMBED), at(emb, "llama-server")
    if w and d:
        print(f"  embeddings worker / direct grouped embed(): {w.rate / d.rate:.2f}")
        checks.append(("embeddings c=8 worker ≥ 0.75× direct grouped embed()", w.rate / d.rate >= 0.75,
                       f"{w.rate / d.rate:.2f}×"))
    if w:
        if s:
            print(f"  embeddings worker / llama-server --embedding: {w.rate / s.rate:.2f}")
        checks.append(("embeddings c=8 worker ≥ 1.0× llama-server --embedding", w.rate >= s.rate if s else None,
                       f"{w.rate / s.rate:.2f}×" if s else ""))
    print("\ntargets (issue 14)")
    for what, met, figures in checks:
        if met is None:
            print(f"  SKIP  {what}: {skipped or 'not measured'}")
        else:
            print(f"  {'PASS' if met else 'FAIL'}  {what}: {figures}")


def find_binary(args: argparse.Namespace) -> tuple[Path | None, str]:
    """The llama-server binary, or None and the reason it is skipped."""
    if args.no_llama_server:
        return None, "--no-llama-server"
    try:
        binary = llama_server.build() if args.build else llama_server.find()
    except llama_server.BuildError as exc:
        return None, str(exc)
    if binary is None:
        return None, ("llama-server not built; run `python scripts/llama_server.py` once (~6 min) or set "
                      "LLAMA_SERVER=/path/to/llama-server")
    return binary, ""


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="completions per point (twice that at c=8)")
    ap.add_argument("--embed-n", type=int, default=256, help="texts per embedding system")
    ap.add_argument("--build", action="store_true", help="build llama-server first when it is missing")
    ap.add_argument("--no-llama-server", action="store_true", help="leave llama-server out")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops what we started
    started = time.monotonic()
    binary, skipped = find_binary(args)
    print(f"llama-server: {binary}" if binary else f"llama-server skipped: {skipped}", flush=True)
    gen = await completions(args, binary)
    emb = await embeddings(args, binary)
    table(gen + emb)
    report(gen, emb, skipped)
    print(f"\n{CORES} cores, shared with whatever else runs; {time.monotonic() - started:.0f} s in all")


if __name__ == "__main__":
    asyncio.run(main())
