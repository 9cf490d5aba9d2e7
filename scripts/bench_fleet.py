"""Benchmark: the fleet over NATS against direct llama-cpp-python calls, in the same run.

40 completions of 32 tokens at temperature 0, sequentially and at concurrency 4. The direct
baseline uses the worker's own Engine (same contexts, threads and prompt), so the difference is
what NATS + JetStream + the worker add. Prints throughput, the fleet/direct ratio and the added
p50/p95 latency. Not a test: figures depend on the machine and its load.

    python scripts/bench_fleet.py [--n 40] [--tokens 32] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nats.aio.msg import Msg  # noqa: E402

from scripts.benchlib import local_worker  # noqa: E402
from workers.config import load_settings  # noqa: E402
from workers.connection import connect  # noqa: E402
from workers.engine import Engine  # noqa: E402
from workers.formats import format_prompt  # noqa: E402
from workers.formats.template import Template  # noqa: E402
from workers.modelfile import resolve  # noqa: E402
from workers.protocol import InferenceRequest, Params  # noqa: E402

SUBJECT = "inference.request.gemma3-270m"


def prompts(n: int) -> list[str]:
    return [f"Question {i}: name one fruit and one colour." for i in range(n)]


async def run_batch(call, items: list[str], concurrency: int) -> tuple[float, list[float]]:
    """Run `call(item)` over items with at most `concurrency` at once; wall seconds and per-call latencies."""
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []

    async def one(item: str) -> None:
        async with sem:
            t0 = time.perf_counter()
            await call(item)
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in items))
    return time.perf_counter() - t0, lat


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


async def transport_floor(url: str, n: int = 100) -> dict[str, float]:
    """What NATS alone costs on this machine: a core request/reply round trip and a JetStream PubAck.

    The fleet path needs both (caller -> ingress -> PubAck, then delivery and the reply), so this
    is the floor under the fleet's added latency.
    """
    responder = await connect(url, name="bench-responder")
    client = await connect(url, name="bench-client")

    async def echo(msg: Msg) -> None:
        await msg.respond(msg.data)

    await responder.subscribe("bench.echo", cb=echo)
    await responder.flush()
    js = client.jetstream()
    await js.add_stream(name="BENCH_FLOOR", subjects=["bench.floor"])
    rtt, puback = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        await client.request("bench.echo", b"x" * 128, timeout=5)
        rtt.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        await js.publish("bench.floor", b"x" * 128)
        puback.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(0.02)
    await js.delete_stream("BENCH_FLOOR")
    await client.close()
    await responder.close()
    return {"rtt": statistics.median(rtt), "puback": statistics.median(puback)}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()

    settings = load_settings("gemma3-270m")
    model = resolve(settings)
    template = Template.load(settings.template_path)
    threads = max(1, (os.cpu_count() or 1) // args.concurrency)
    params = Params(max_tokens=args.tokens, temperature=0)
    items = prompts(args.n)

    engine = Engine(model, embedding=False, concurrency=args.concurrency, ctx_size=settings.ctx_size,
                    threads=threads)
    await engine.load()

    async def direct(text: str) -> None:
        out = await engine.complete(format_prompt(InferenceRequest(input=text), template), params, stop=template.stop)
        assert out.tokens_out > 0

    async with local_worker("gemma3-270m", MODEL_PATH=str(model), WORKER_CONCURRENCY=str(args.concurrency),
                            MODEL_THREADS=str(threads)) as w:
        nc, url = w.nc, w.url
        engine_ms: list[float] = []

        async def fleet(text: str) -> None:
            body = json.dumps({"input": text, "params": {"max_tokens": args.tokens, "temperature": 0}})
            msg = await nc.request(SUBJECT, body.encode(), timeout=120)
            out = json.loads(msg.data)
            assert out["tokens_out"] > 0, out
            engine_ms.append(out["duration_ms"])

        floor = await transport_floor(url)
        # warm both paths (page cache, prompt cache) before measuring
        await run_batch(direct, items[:4], args.concurrency)
        await run_batch(fleet, items[:4], args.concurrency)
        engine_ms.clear()
        rows = []
        for label, conc in (("sequential", 1), (f"concurrency {args.concurrency}", args.concurrency)):
            # ABBA order so drift in the machine's load does not favour either side
            half = items[: len(items) // 2], items[len(items) // 2 :]
            engine_ms.clear()
            d1, l1 = await run_batch(direct, half[0], conc)
            f1, m1 = await run_batch(fleet, half[0], conc)
            f2, m2 = await run_batch(fleet, half[1], conc)
            d2, l2 = await run_batch(direct, half[1], conc)
            d_wall, d_lat, f_wall, f_lat = d1 + d2, l1 + l2, f1 + f2, m1 + m2
            print(f"{label}: direct median {statistics.median(d_lat) * 1000:.0f} ms, worker engine median "
                  f"{statistics.median(engine_ms):.0f} ms, fleet median {statistics.median(f_lat) * 1000:.0f} ms")
            overhead = [f * 1000 - e for f, e in zip(sorted(f_lat), sorted(engine_ms), strict=False)]
            rows.append((label, args.n / d_wall, args.n / f_wall, d_lat, f_lat, overhead))
    engine.close()

    print(f"\n{args.n} completions × {args.tokens} tokens, temperature 0, gemma3-270m, "
          f"{threads} thread(s) per context, {os.cpu_count()} cores")
    print(f"{'mode':<16}{'direct req/s':>13}{'fleet req/s':>13}{'ratio':>8}{'added p50 ms':>14}{'added p95 ms':>14}"
          f"{'overhead p50 ms':>17}")
    for label, d_rps, f_rps, d_lat, f_lat, overhead in rows:
        add50 = (statistics.median(f_lat) - statistics.median(d_lat)) * 1000
        add95 = (pct(f_lat, 95) - pct(d_lat, 95)) * 1000
        print(f"{label:<16}{d_rps:>13.2f}{f_rps:>13.2f}{f_rps / d_rps:>8.3f}{add50:>14.1f}{add95:>14.1f}"
              f"{statistics.median(overhead):>17.1f}")
    print(f"\nNATS floor on this machine (same run): core request/reply p50 {floor['rtt']:.2f} ms, "
          f"JetStream PubAck p50 {floor['puback']:.2f} ms; the fleet path needs both "
          f"(≈{floor['rtt'] + floor['puback']:.2f} ms) before any work of ours.")
    print("ratio = fleet/direct throughput; added = fleet minus direct latency percentiles; "
          "overhead = caller's latency minus the worker's own engine time (NATS + JetStream + worker).")


if __name__ == "__main__":
    asyncio.run(main())
