"""Throughput of the batching Scheduler against today's Engine (WORKER_CONCURRENCY=2), same GGUF, 2 threads.

8 requests × 64 tokens at temperature 0, sent at concurrency 1, 4 and 8; prints aggregate tokens/s. Not a test.
Run: .venv/bin/python scripts/bench_scheduler.py
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.batching import Scheduler  # noqa: E402
from workers.config import load_settings  # noqa: E402
from workers.engine import Engine  # noqa: E402
from workers.modelfile import resolve  # noqa: E402
from workers.protocol import Params  # noqa: E402

N, TOKENS, THREADS, CTX = 8, 64, 2, 1024
PROMPTS = [f"Tell me fact number {i} about the sea." for i in range(N)]


async def run(engine: Any, concurrency: int) -> float:
    gate = asyncio.Semaphore(concurrency)
    p = Params(max_tokens=TOKENS, temperature=0)

    async def one(prompt: str) -> int:
        async with gate:
            return int((await engine.complete(prompt, p)).tokens_out)

    t0 = time.perf_counter()
    out = await asyncio.gather(*(one(x) for x in PROMPTS))
    return sum(out) / (time.perf_counter() - t0)


async def main() -> None:
    path = resolve(load_settings("gemma3-270m"))
    rows: dict[str, list[float]] = {}
    engine = Engine(path, embedding=False, concurrency=2, ctx_size=CTX, threads=1)  # the worker's default
    await engine.load()
    await engine.complete("warm up", Params(max_tokens=4, temperature=0))
    rows["Engine, 2 contexts × 1 thread"] = [await run(engine, c) for c in (1, 4, 8)]
    engine.close()
    sched = Scheduler(path, slots=8, ctx_size=CTX, threads=THREADS)
    await sched.load()
    await sched.complete("warm up", Params(max_tokens=4, temperature=0))
    rows["Scheduler, 8 slots × 2 threads"] = [await run(sched, c) for c in (1, 4, 8)]
    sched.close()
    print(f"| {N} requests × {TOKENS} tokens | c=1 tok/s | c=4 tok/s | c=8 tok/s |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{x:.1f}" for x in r) + " |")


if __name__ == "__main__":
    asyncio.run(main())
