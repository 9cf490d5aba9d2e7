"""Prometheus metrics for one worker, named like vLLM's and llama.cpp server's, labelled by model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from .outcome import Finished

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class Metrics:
    """One registry per worker process (so tests and several workers never share state)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.registry = r = CollectorRegistry()
        m = ["model"]
        self.prompt_tokens = Counter("llm_prompt_tokens", "Prompt tokens processed", m, registry=r)
        self.generation_tokens = Counter("llm_generation_tokens", "Tokens generated", m, registry=r)
        self.requests = Counter("llm_requests", "Finished requests", ["model", "status", "finish_reason"], registry=r)
        self.running = Gauge("llm_requests_running", "Requests running on this instance", m, registry=r)
        self.waiting = Gauge("llm_requests_waiting", "Requests queued for the model (JetStream)", m, registry=r)
        self.e2e = Histogram("llm_e2e_request_latency_seconds", "Enqueue to reply", m, buckets=LATENCY_BUCKETS,
                             registry=r)
        self.queue_time = Histogram("llm_request_queue_time_seconds", "Time spent queued", m,
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("llm_time_to_first_token_seconds", "Time to first token", m, buckets=LATENCY_BUCKETS,
                              registry=r)
        self.ready = Gauge("llm_worker_ready", "1 when the worker takes requests", m, registry=r)
        self.load_seconds = Gauge("llm_model_load_seconds", "Seconds the model took to load", m, registry=r)
        for g in (self.running, self.waiting, self.ready, self.load_seconds):
            g.labels(model)

    def observe(self, f: Finished) -> None:
        """Count one finished request."""
        model, run = self.model, f.run
        self.requests.labels(model, f.status, f.finish_reason or "none").inc()
        if run.tokens_in:
            self.prompt_tokens.labels(model).inc(run.tokens_in)
        if run.tokens_out:
            self.generation_tokens.labels(model).inc(run.tokens_out)
        if f.status != "ok":
            return
        queue_s = f.intake.queue_ms / 1000
        self.queue_time.labels(model).observe(queue_s)
        self.e2e.labels(model).observe(queue_s + (f.dur_ms or 0) / 1000)
        if run.ttft_ms is not None:
            self.ttft.labels(model).observe(run.ttft_ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
