"""Benchmark: the minilm-l6-v2 embedding worker over NATS against direct llama-cpp-python, in the same run.

Part 1 (how to batch, direct llama-cpp-python): short texts embedded one per `Llama.embed` call, or
grouped into calls of up to 32 / 64 / 128 / 256 / 512 tokens (what workers/embed_batch.py does with
`EMBED_BATCH_TOKENS`), with 1 and 2 threads. Configurations take turns over several rounds so drift in
the machine's load does not favour one of them; the best round of each is printed.

Part 2 (what the fleet adds): N short texts through NATS, one text per request at concurrency 8 and
50 texts per request, against the worker's own Engine called directly with the same settings. Prints
texts/s and the fleet/direct ratios. Not a test: figures depend on the machine and its load.

    python scripts/bench_embed.py [--n 1000] [--sweep-n 100] [--rounds 3] [--no-sweep]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from scripts.benchlib import local_worker  # noqa: E402
from workers.config import load_settings  # noqa: E402
from workers.engine import POOLING, Engine  # noqa: E402
from workers.modelfile import resolve  # noqa: E402

NAME = "minilm-l6-v2"
SUBJECT = f"embedding.request.{NAME}"
GROUPS = (0, 32, 64, 128, 256, 512)  # tokens per llama call; 0 = one text per call


def texts(n: int) -> list[str]:
    """Short, varied sentences (10-20 tokens), like search queries or titles."""
    subjects = ["The weather", "A new library", "Our quarterly report", "The football match", "This recipe",
                "The train to Berlin", "A small startup", "The museum exhibit"]
    verbs = ["looks promising", "was delayed again", "surprised everyone", "needs more salt",
             "is sold out for tonight", "got great reviews", "raised more money"]
    return [f"{subjects[i % len(subjects)]} {verbs[i % len(verbs)]}, item {i} of the list." for i in range(n)]


def sweep(model: Path, ctx_size: int, n: int, rounds: int) -> None:
    from llama_cpp import Llama

    items = texts(n)
    models = {t: Llama(str(model), embedding=True, pooling_type=POOLING["mean"], n_ctx=ctx_size, n_batch=ctx_size,
                       n_ubatch=ctx_size, n_threads=t, n_threads_batch=t, verbose=False) for t in (1, 2)}
    counts = [len(models[1].tokenize(t.encode())) for t in items]

    def grouped(budget: int) -> list[list[str]]:
        if budget == 0:
            return [[t] for t in items]
        out: list[list[str]] = [[]]
        size = 0
        for text, c in zip(items, counts, strict=True):
            if out[-1] and size + c > budget:
                out.append([])
                size = 0
            out[-1].append(text)
            size += c
        return out

    best: dict[tuple[int, int], float] = {}
    for _ in range(rounds):
        for threads, llm in models.items():
            for budget in GROUPS:
                calls = grouped(budget)
                t0 = time.perf_counter()
                for call in calls:
                    llm.embed(call, truncate=False)
                rate = n / (time.perf_counter() - t0)
                best[threads, budget] = max(best.get((threads, budget), 0.0), rate)
    for llm in models.values():
        llm.close()
    print(f"\nPart 1: {n} texts of {min(counts)}-{max(counts)} tokens, direct Llama.embed, best of {rounds} rounds "
          f"(texts/s; {os.cpu_count()} cores shared with whatever else runs)")
    print(f"{'grouping':<26}" + "".join(f"{f'{t} thread(s)':>14}" for t in models))
    for budget in GROUPS:
        label = "one text per call" if budget == 0 else f"≤{budget} tokens per call"
        print(f"{label:<26}" + "".join(f"{best[t, budget]:>14.0f}" for t in models))


async def run(call: Callable[[list[str]], Awaitable[None]], batches: list[list[str]], concurrency: int) -> float:
    """Seconds to send every batch through `call` with at most `concurrency` in flight."""
    sem = asyncio.Semaphore(concurrency)

    async def one(batch: list[str]) -> None:
        async with sem:
            await call(batch)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(b) for b in batches))
    return time.perf_counter() - t0


async def fleet_vs_direct(model: Path, n: int) -> None:
    settings = load_settings(NAME)
    items = texts(n)
    engine = Engine(model, embedding=True, concurrency=settings.worker_concurrency, ctx_size=settings.ctx_size,
                    threads=settings.model_threads, pooling=settings.pooling, normalize=settings.embed_normalize)
    await engine.load()

    async def direct(batch: list[str]) -> None:
        out = await engine.embed(batch)
        assert len(out.vectors) == len(batch)

    async with local_worker(NAME, MODEL_PATH=str(model)) as w:
        nc = w.nc

        async def fleet(batch: list[str]) -> None:
            msg = await nc.request(SUBJECT, json.dumps({"input": batch}).encode(), timeout=300)
            out = json.loads(msg.data)
            assert len(out.get("data", [])) == len(batch), out

        singles = [[t] for t in items]
        fifties = [items[i : i + 50] for i in range(0, n, 50)]
        await run(direct, singles[:16], 8)  # warm both paths
        await run(fleet, singles[:16], 8)
        rows = []
        for label, batches, conc in (("1 text/request, 8 in flight", singles, 8),
                                     ("50 texts/request", fifties, 8)):
            # ABBA order so drift in the machine's load does not favour either side
            half = len(batches) // 2
            d = await run(direct, batches[:half], conc)
            f = await run(fleet, batches[:half], conc)
            f += await run(fleet, batches[half:], conc)
            d += await run(direct, batches[half:], conc)
            rows.append((label, n / d, n / f))
    engine.close()
    print(f"\nPart 2: {n} texts, {NAME} worker (1 context grouping up to {settings.embed_batch_max} requests, "
          f"{settings.model_threads} thread(s) × {settings.worker_concurrency}, "
          f"EMBED_NORMALIZE={int(settings.embed_normalize)}) "
          "vs its Engine called directly")
    print(f"{'mode':<30}{'direct texts/s':>16}{'fleet texts/s':>15}{'fleet/direct':>14}")
    for label, d_rate, f_rate in rows:
        print(f"{label:<30}{d_rate:>16.0f}{f_rate:>15.0f}{f_rate / d_rate:>14.2f}")
    print(f"50 texts/request vs 1 text/request over NATS: {rows[1][2] / rows[0][2]:.2f}×")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="texts through the fleet and directly (part 2)")
    ap.add_argument("--sweep-n", type=int, default=100, help="texts per configuration in part 1")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of part 1")
    ap.add_argument("--no-sweep", action="store_true", help="skip part 1")
    args = ap.parse_args()
    settings = load_settings(NAME)
    model = resolve(settings)
    if not args.no_sweep:
        sweep(model, settings.ctx_size, args.sweep_n, args.rounds)
    asyncio.run(fleet_vs_direct(model, args.n))


if __name__ == "__main__":
    main()
