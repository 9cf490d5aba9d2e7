"""What users watch, in every heartbeat: the last STATS_WINDOW_S seconds of finished requests, and the host.

`Window` is fed by the Ledger (one `record` per finished request) and read by telemetry at every heartbeat and
health reply, so both sides are cheap: a record appends a few numbers, a read sorts the window's latencies.
`Host` samples the machine with psutil (and `nvidia-smi` where one exists), at most once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import psutil  # type: ignore[import-untyped]

from . import protocol as p
from .outcome import Finished

MAX_ENTRIES = 200_000  # a bound on memory: ~3,300 requests/s over a 60 s window
ERROR_STATUSES = frozenset({"failed", "rejected", "expired", "dead_letter"})  # cancelled is the caller's choice
HOST_SAMPLE_S = 1.0  # health replies in between get the last sample
GPU_QUERY = ("name", "utilization.gpu", "memory.used", "memory.total")
GPU_TIMEOUT_S = 2.0
MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Entry:
    ts: float  # epoch seconds it finished
    ok: bool
    error: bool
    dur_ms: float | None
    ttft_ms: float | None
    queue_ms: float
    tokens_out: int


class Window:
    """Requests finished in the last `window_s` seconds. Rates divide by the window, or by the time since
    `started_at` (epoch seconds; the worker's start) while that is shorter."""

    def __init__(self, window_s: float = 60.0, started_at: float | None = None) -> None:
        self.window_s = window_s
        self.started_at = time.time() if started_at is None else started_at
        self._entries: deque[_Entry] = deque(maxlen=MAX_ENTRIES)

    def record(self, f: Finished) -> None:
        generated = f.run.ttft_ms is not None
        self._entries.append(_Entry(
            ts=f.ts, ok=f.status == "ok", error=f.status in ERROR_STATUSES, dur_ms=f.dur_ms,
            ttft_ms=f.run.ttft_ms if generated else None, queue_ms=f.intake.queue_ms, tokens_out=f.run.tokens_out))

    def _prune(self, now: float) -> None:
        since = now - self.window_s
        while self._entries and self._entries[0].ts < since:
            self._entries.popleft()

    def stats(self, now: float | None = None) -> p.WindowStats:
        """The window as the heartbeat carries it (percentiles of `ok` requests, None when there are none)."""
        now = time.time() if now is None else now
        self._prune(now)
        entries = [e for e in self._entries if e.ts <= now]
        span = max(min(self.window_s, now - self.started_at), 1.0)
        ok = [e for e in entries if e.ok]
        durations = sorted(e.dur_ms for e in ok if e.dur_ms is not None)
        ttfts = sorted(e.ttft_ms for e in ok if e.ttft_ms is not None)
        decode = sorted(max(0.0, e.dur_ms - e.ttft_ms) for e in ok if e.ttft_ms is not None and e.dur_ms is not None)
        speeds = sorted(e.tokens_out / ((e.dur_ms - e.ttft_ms) / 1000) for e in ok
                        if e.ttft_ms is not None and e.dur_ms is not None and e.dur_ms > e.ttft_ms and e.tokens_out)
        errors = sum(e.error for e in entries)
        tokens = sum(e.tokens_out for e in entries)
        ttft_p50 = percentile(ttfts, 50)
        return p.WindowStats(
            window_s=self.window_s, requests=len(entries), rate_per_s=round(len(entries) / span, 4),
            errors=errors, error_rate=round(errors / len(entries), 4) if entries else 0.0,
            latency_p50_ms=percentile(durations, 50), latency_p95_ms=percentile(durations, 95),
            ttft_p50_ms=ttft_p50, queue_wait_p50_ms=percentile(sorted(e.queue_ms for e in ok), 50),
            prefill_p50_ms=ttft_p50, decode_p50_ms=percentile(decode, 50),
            tokens_out=tokens, tokens_per_s=round(tokens / span, 3), decode_tokens_per_s=percentile(speeds, 50),
            mean_service_ms=round(sum(durations) / len(durations), 3) if durations else None,
        )


def percentile(ordered: list[float], q: float) -> float | None:
    """The q-th percentile of sorted values, interpolated between neighbours (numpy's default; q=50 is the
    median); None for no values."""
    if not ordered:
        return None
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return round(ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo), 3)


class Host:
    """The machine a worker runs on, sampled at most once a second (psutil calls are microseconds; the GPU query
    is a process, so `refresh_gpus` starts it in the background and the heartbeat does not wait for it)."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        psutil.cpu_percent(interval=None)  # the first call starts the interval the next one measures
        self._last: p.HostStats | None = None
        self._at = 0.0
        self.nvidia_smi = shutil.which("nvidia-smi")
        self.gpus: list[dict[str, Any]] = []
        self._query: asyncio.Task[None] | None = None

    def sample(self) -> p.HostStats:
        now = time.monotonic()
        if self._last is not None and now - self._at < HOST_SAMPLE_S:
            return self._last
        mem = psutil.virtual_memory()
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        self._last = p.HostStats(
            cpu_percent=psutil.cpu_percent(interval=None), memory_percent=mem.percent,
            memory_used_mb=round((mem.total - mem.available) / MB, 1), memory_total_mb=round(mem.total / MB, 1),
            process_rss_mb=round(self._process.memory_info().rss / MB, 1),
            load_1m=round(load, 2) if load is not None else None, gpus=self.gpus,
        )
        self._at = now
        return self._last

    def refresh_gpus(self) -> None:
        """Start asking nvidia-smi (if there is one) for each GPU's use, unless a query is still running; the
        answer shows from the next sample on (a failed query keeps the last one)."""
        if self.nvidia_smi is None or (self._query is not None and not self._query.done()):
            return
        self._query = asyncio.get_running_loop().create_task(self._ask_gpus(self.nvidia_smi))

    async def _ask_gpus(self, binary: str) -> None:
        with contextlib.suppress(Exception):
            proc = await asyncio.create_subprocess_exec(
                binary, f"--query-gpu={','.join(GPU_QUERY)}", "--format=csv,noheader,nounits",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), GPU_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                return
            if proc.returncode == 0:
                self.gpus = parse_gpus(out.decode(errors="replace"))


def parse_gpus(csv: str) -> list[dict[str, Any]]:
    """nvidia-smi's `name, utilization.gpu, memory.used, memory.total` lines as dicts ("[N/A]" becomes None)."""
    gpus = []
    for line in csv.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != len(GPU_QUERY):
            continue
        name, *numbers = cells
        util, used, total = (_number(c) for c in numbers)
        gpus.append({"name": name, "utilization_percent": util, "memory_used_mb": used, "memory_total_mb": total})
    return gpus


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None
