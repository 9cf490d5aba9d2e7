"""The response cache for deterministic requests, shared by every gateway in a JetStream Key-Value bucket
(issue 16 item 6).

A request is deterministic when it samples greedily (`temperature` 0) or fixes a `seed`; an embedding always is.
Its answer is kept for CACHE_TTL_S (0: no cache) in the bucket `FLEET_CACHE`, created by the first gateway that
needs it, so a second gateway behind the same load balancer answers from the first one's work. The key is the
SHA-256 of the route and the body's canonical JSON, without the fields that do not change the answer (`stream`,
`user`, `stream_options`); a model alias (`primary`, `auto`) is part of the key as sent, so it gets the answer of
whichever model answered it first, until the TTL.

The cache is a convenience: a NATS or JetStream failure makes a lookup a miss and a store a no-op, logged once
per outage, and the request goes to the fleet as if there were no cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import APIError, BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

from .config import GatewaySettings

log = logging.getLogger(__name__)

BUCKET = "FLEET_CACHE"
IGNORED = frozenset({"stream", "user", "stream_options"})  # fields that do not change the answer
TIMEOUT_S = 2.0  # a cache that answers slower than this is treated as down for the request
RETRY_S = 5.0  # after a failure, the cache is left alone this long (a request does not wait for a dead one)


def deterministic(route: str, body: dict[str, Any]) -> bool:
    """Whether the same body always gets the same answer: greedy sampling, a fixed seed, or an embedding."""
    if route == "embeddings":
        return True
    temperature, seed = body.get("temperature"), body.get("seed")
    greedy = isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0
    return greedy or (isinstance(seed, int) and not isinstance(seed, bool))


def cache_key(route: str, body: dict[str, Any]) -> str:
    """`<route>.<sha256 hex>`: only characters a KV key allows."""
    canonical = json.dumps({k: v for k, v in body.items() if k not in IGNORED}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(f"{route}\n{canonical}".encode()).hexdigest()
    return f"{route}.{digest}"


class ResponseCache:
    def __init__(self, settings: GatewaySettings, nc: Callable[[], NATS | None]) -> None:
        self.settings, self._nc = settings, nc
        self._kv: tuple[NATS, KeyValue] | None = None  # the bucket, for the connection it was opened on
        self._down_until = 0.0
        self._warned = False

    def key(self, route: str, body: dict[str, Any]) -> str | None:
        """The cache key of a deterministic request (temperature 0 or a fixed seed), None when it is not one, is
        streamed, or the cache is off (CACHE_TTL_S=0)."""
        if self.settings.cache_ttl_s <= 0 or body.get("stream") or not deterministic(route, body):
            return None
        return cache_key(route, body)

    async def get(self, key: str) -> dict[str, Any] | None:
        """The stored response, or None (not there, expired, or the cache is unreachable)."""
        kv = await self._bucket()
        if kv is None:
            return None
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            self._up()
            return None
        except Exception as e:  # any NATS trouble: a miss
            self._failed("read", e)
            return None
        self._up()
        try:
            value = json.loads(entry.value or b"")
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    async def put(self, key: str, response: dict[str, Any]) -> None:
        """Keep `response` for CACHE_TTL_S; one larger than a NATS message is not kept."""
        kv = await self._bucket()
        if kv is None:
            return
        data = json.dumps(response, separators=(",", ":")).encode()
        nc = self._nc()
        if nc is not None and len(data) > nc.max_payload - 1024:  # headroom for the subject and headers
            return
        try:
            await kv.put(key, data)
        except Exception as e:
            self._failed("write", e)
            return
        self._up()

    async def _bucket(self) -> KeyValue | None:
        """The bucket on the current connection, created on first use; None while NATS is down."""
        nc = self._nc()
        if nc is None or not nc.is_connected or time.monotonic() < self._down_until:
            return None
        if self._kv is not None and self._kv[0] is nc:
            return self._kv[1]
        try:
            kv = await self._open(nc)
        except Exception as e:
            self._failed("open", e)
            return None
        self._kv = (nc, kv)
        return kv

    async def _open(self, nc: NATS) -> KeyValue:
        js = nc.jetstream(timeout=TIMEOUT_S)
        try:
            return await js.key_value(BUCKET)
        except BucketNotFoundError:
            pass
        # STREAM_REPLICAS where the settings have it (the workers' buckets follow it); one copy otherwise
        replicas = int(getattr(self.settings, "stream_replicas", 1))
        config = KeyValueConfig(bucket=BUCKET, history=1, ttl=self.settings.cache_ttl_s, storage=StorageType.FILE,
                                replicas=replicas, description="deterministic answers of the gateways")
        try:
            return await js.create_key_value(config)
        except APIError:
            try:  # another gateway made it first (perhaps with another TTL: theirs holds)
                return await js.key_value(BUCKET)
            except BucketNotFoundError:
                if replicas <= 1:
                    raise
            config.replicas = 1  # a single server, or too few up (as the workers' buckets do)
            return await js.create_key_value(config)

    def _failed(self, what: str, e: Exception) -> None:
        self._down_until = time.monotonic() + RETRY_S
        self._kv = None  # opened again next time: the bucket may have been deleted and made anew
        if not self._warned:
            self._warned = True
            log.warning("response cache: cannot %s bucket %s (%s: %s); answering without the cache until it works "
                        "again", what, BUCKET, type(e).__name__, e)

    def _up(self) -> None:
        if self._warned:
            self._warned = False
            log.info("response cache: bucket %s works again", BUCKET)
