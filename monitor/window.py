"""Window stats (`protocol.WindowStats`) as the monitor shows them: one instance's, and a model's put together.

A model's numbers combine its live instances' (the rules are in shapes.WindowEntry's docstring): the monitor
gets percentiles, not samples, so sums stay exact, p95 is the worst instance's and p50 the median of theirs.
"""

from __future__ import annotations

import statistics

from workers import protocol as p

from .shapes import WindowEntry


def instance_window(s: p.WindowStats) -> WindowEntry:
    return WindowEntry(window_s=s.window_s, instances=1, requests=s.requests, rate_per_s=s.rate_per_s,
                       errors=s.errors, error_rate=s.error_rate, latency_p50_ms=s.latency_p50_ms,
                       latency_p95_ms=s.latency_p95_ms, ttft_p50_ms=s.ttft_p50_ms,
                       queue_wait_p50_ms=s.queue_wait_p50_ms, tokens_out=s.tokens_out, tokens_per_s=s.tokens_per_s,
                       decode_tokens_per_s=s.decode_tokens_per_s)


def model_window(stats: list[p.WindowStats]) -> WindowEntry | None:
    """The instances' windows combined; None if there are none."""
    if not stats:
        return None

    def median(name: str) -> float | None:
        known = [v for s in stats if (v := getattr(s, name)) is not None]
        return round(statistics.median(known), 1) if known else None

    requests, errors = sum(s.requests for s in stats), sum(s.errors for s in stats)
    p95 = [s.latency_p95_ms for s in stats if s.latency_p95_ms is not None]
    return WindowEntry(
        window_s=max(s.window_s for s in stats), instances=len(stats), requests=requests,
        rate_per_s=round(sum(s.rate_per_s for s in stats), 3), errors=errors,
        error_rate=round(errors / requests, 4) if requests else 0.0,
        latency_p50_ms=median("latency_p50_ms"), latency_p95_ms=max(p95) if p95 else None,
        ttft_p50_ms=median("ttft_p50_ms"), queue_wait_p50_ms=median("queue_wait_p50_ms"),
        tokens_out=sum(s.tokens_out for s in stats), tokens_per_s=round(sum(s.tokens_per_s for s in stats), 2),
        decode_tokens_per_s=median("decode_tokens_per_s"),
    )
