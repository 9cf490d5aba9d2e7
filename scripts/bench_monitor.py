"""The monitor under a large simulated fleet: memory stays bounded and /api/services stays fast.

Starts its own nats-server and a real `python -m monitor` process, then publishes heartbeats (and every
second a backpressure report) for N simulated instances at R Hz for D seconds, while timing /api/services
and watching the monitor's RSS and CPU time. A second phase replaces every instance on every beat (a
restart storm: new worker_ids) to show MONITOR_MAX_INSTANCES bounding memory. Prints figures; asserts nothing.

    .venv/bin/python scripts/bench_monitor.py [--instances 200] [--hz 5] [--seconds 10]
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
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers import protocol as p  # noqa: E402
from workers.connection import NATS, connect  # noqa: E402
from workers.ops import broker  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def body(i: int, seq: int, prefix: str, interval: float) -> dict[str, Any]:
    model = f"sim-model-{i % 20}.v1"  # 20 dotted models, 10 instances each at 200
    depth = (seq * 7 + i) % 40
    return {
        "model_name": model, "worker_id": f"{prefix}-{i}", "kind": "inference", "status": "online",
        "capabilities": ["text-generation"], "endpoint": f"http://host-{i}:5770",
        "nats_topic": f"inference.request.{model}", "version": p.VERSION,
        "model_info": {"architecture": "gemma3", "parameter_count": "268M", "quantization": "Q4_K_M",
                       "context_size": 2048},
        "queue_metrics": {"pending_messages": depth, "active_processing": 1, "queue_capacity": 100,
                          "total_processed": seq * 3, "total_failed": 0, "last_processed_at": time.time()},
        "backpressure_status": {"level": p.backpressure_level(depth / 100), "utilization": depth / 100},
        "started_at": time.time() - 60, "uptime_s": 60.0, "heartbeat_interval_s": interval, "seq": seq,
    }


def get(url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as r:
        n = len(r.read())
    return (time.perf_counter() - t0) * 1000, n


async def phase(nc: NATS, url: str, pid: int, n: int, hz: float, seconds: float, churn: bool) -> None:
    interval = 1 / hz
    stop = time.monotonic() + seconds
    timings: list[float] = []
    size = 0
    sent = 0
    seq = 0
    cpu0, t0 = cpu_s(pid), time.monotonic()
    rss_peak = rss_mb(pid)

    async def poll() -> None:
        nonlocal size, rss_peak
        while time.monotonic() < stop:
            ms, size = await asyncio.to_thread(get, f"{url}/api/services")
            timings.append(ms)
            rss_peak = max(rss_peak, rss_mb(pid))
            await asyncio.sleep(0.25)

    poller = asyncio.create_task(poll())
    while time.monotonic() < stop:
        tick = time.monotonic()
        seq += 1
        prefix = f"churn{seq}" if churn else "sim"
        for i in range(n):
            b = body(i, seq, prefix, interval)
            await nc.publish(p.heartbeat_subject(b["model_name"]), json.dumps(b).encode())
            if seq % max(1, round(hz)) == 0:
                report = {"model_name": b["model_name"], "worker_id": b["worker_id"],
                          "pending_messages": b["queue_metrics"]["pending_messages"], "active_processing": 1,
                          "queue_capacity": 100, "utilization": b["backpressure_status"]["utilization"],
                          "status": b["backpressure_status"]["level"], "worker_count": 10, "timestamp": time.time()}
                await nc.publish(p.monitoring_subject("inference", b["model_name"]), json.dumps(report).encode())
            sent += 1
        await nc.flush()
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - tick)))
    await poller
    await asyncio.sleep(1.0)
    elapsed = time.monotonic() - t0
    health = json.loads(await asyncio.to_thread(lambda: urllib.request.urlopen(f"{url}/healthz", timeout=5).read()))
    timings.sort()
    name = "restart storm (new worker_id every beat)" if churn else f"{n} instances steady"
    print(f"\n{name}: {sent} heartbeats in {elapsed:.1f} s ({sent / elapsed:.0f}/s)")
    print(f"  monitor took in: {health['heartbeats']} heartbeats, {health['reports']} reports, "
          f"{health['invalid']} invalid; holds {health['instances']} instances in {health['models']} models; "
          f"evicted {health['evicted']}")
    print(f"  /api/services: {len(timings)} calls, p50 {statistics.median(timings):.1f} ms, "
          f"p95 {timings[int(len(timings) * 0.95) - 1]:.1f} ms, max {timings[-1]:.1f} ms, {size / 1024:.0f} KiB")
    print(f"  monitor RSS: peak {rss_peak:.1f} MiB, now {rss_mb(pid):.1f} MiB; "
          f"CPU {100 * (cpu_s(pid) - cpu0) / elapsed:.0f}% of one core")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--hz", type=float, default=5.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max-instances", type=int, default=1000)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-monitor-"))
    port, mport = broker.free_port(), broker.free_port()
    server = broker.start(port, tmp / "js")
    nats_url, url = f"nats://127.0.0.1:{port}", f"http://127.0.0.1:{mport}"
    env = {**os.environ, "NATS_URL": nats_url, "MONITOR_ADDR": f"127.0.0.1:{mport}",
           "MONITOR_MAX_INSTANCES": str(args.max_instances)}
    mon = subprocess.Popen([sys.executable, "-m", "monitor"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                await asyncio.to_thread(urllib.request.urlopen, f"{url}/healthz", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the monitor did not come up") from None
                await asyncio.sleep(0.1)
        print(f"monitor pid {mon.pid}, idle RSS {rss_mb(mon.pid):.1f} MiB; MONITOR_MAX_INSTANCES={args.max_instances}")
        nc = await connect(nats_url, name="bench-monitor")
        try:
            await phase(nc, url, mon.pid, args.instances, args.hz, args.seconds, churn=False)
            await phase(nc, url, mon.pid, args.instances, args.hz, args.seconds, churn=True)
        finally:
            await nc.close()
    finally:
        mon.terminate()
        mon.wait(10)
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    asyncio.run(main())
