"""The gateway's Prometheus metrics on `/metrics` (issue 16 items 5 and 6).

One registry per gateway process (as each worker has its own, workers/metrics.py), so every gateway behind a load
balancer is scraped on its own and tests never share counters. `client` is the key's name from the keys file, or
`anonymous` (no keys file, or a request refused before its key was known); `model` is the model that answered.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

ANONYMOUS = "anonymous"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("fleet_gateway_requests", "Answered HTTP requests of the OpenAI routes",
                                ["route", "model", "client", "status"], registry=r)
        self.seconds = Histogram("fleet_gateway_request_seconds", "HTTP request to response (headers)", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.token_count = Counter("fleet_gateway_tokens", "Tokens used by clients' requests (in: prompt, out: "
                                   "completion)", ["client", "model", "direction"], registry=r)
        self.cache_lookups = Counter("fleet_gateway_cache", "Response cache lookups of deterministic requests",
                                     ["result"], registry=r)
        self.limited = Counter("fleet_gateway_rate_limited", "Requests refused by a key's rate limit", ["client"],
                               registry=r)
        for result in ("hit", "miss"):
            self.cache_lookups.labels(result)

    def request(self, route: str, model: str, client: str | None, status: int, seconds: float) -> None:
        """One answered HTTP request."""
        self.requests.labels(route, model, client or ANONYMOUS, str(status)).inc()
        self.seconds.labels(route).observe(seconds)

    def tokens(self, client: str | None, model: str, tokens_in: int, tokens_out: int) -> None:
        """Tokens used by a client's request."""
        who = client or ANONYMOUS
        if tokens_in:
            self.token_count.labels(who, model, "in").inc(tokens_in)
        if tokens_out:
            self.token_count.labels(who, model, "out").inc(tokens_out)

    def cache(self, hit: bool) -> None:
        """A cache lookup."""
        self.cache_lookups.labels("hit" if hit else "miss").inc()

    def rate_limited(self, client: str) -> None:
        """A request refused because its client used up a limit."""
        self.limited.labels(client).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def routes(self) -> list[Route]:
        async def metrics(_: Request) -> Response:
            return Response(self.render(), media_type=CONTENT_TYPE_LATEST)

        return [Route("/metrics", metrics, methods=["GET"])]
