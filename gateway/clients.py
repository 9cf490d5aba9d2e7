"""API keys and per-key rate limits (issue 16 item 5).

Keys live in a TOML file (GATEWAY_KEYS_FILE) as SHA-256 digests only, so the file is no secret worth stealing;
`scripts/gateway_keys.py add <name>` makes a key, prints it once and appends its digest:

    [[keys]]
    name = "alice"       # the client's name in the metrics and logs
    sha256 = "9f86d0…"   # hex of sha256(key)
    rpm = 60             # requests per minute; 0 or absent: unlimited
    tpm = 20000          # tokens (prompt + completion) per minute; 0 or absent: unlimited

A client sends its key as `Authorization: Bearer <key>` (what the openai client does) or `x-api-key`. Without a
keys file every request is let in, unnamed. The limits are sliding windows of 60 s held in this process: a gateway
behind a load balancer limits per instance (n gateways let a key through up to n times its limits); a limit shared
by every gateway would need a counter in a JetStream KV bucket, a round trip per request.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import time
import tomllib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.requests import Request

from workers import protocol as p
from workers.access import bearer
from workers.settings import ConfigError

from .config import GatewaySettings
from .metrics import ANONYMOUS, GatewayMetrics

WINDOW_S = 60.0
INTERNAL = "x-fleet-internal"
WEBHOOK = "webhook"  # the client name of jobs that came in through POST /webhooks/ingest
FIELDS = {"name", "sha256", "rpm", "tpm", "admin"}
HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Key:
    """One client's key as the keys file holds it."""

    name: str
    digest: bytes  # sha256 of the key
    rpm: int = 0  # requests per minute, 0: unlimited
    tpm: int = 0  # tokens per minute, 0: unlimited
    admin: bool = False  # may load and unload models (POST /v1/models/{id}/load, unload)


class Limited(p.BadRequest):
    """429 rate_limited with the seconds until a request would be admitted (the Retry-After header)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__("rate_limited", message, status=429)
        self.retry_after = retry_after


def digest_of(key: str) -> str:
    """What the keys file stores for `key`: the hex of its SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()


def load_keys(path: str | Path) -> list[Key]:
    """The keys of a keys file; ConfigError names the file, the line and what to fix."""
    where = f"GATEWAY_KEYS_FILE={path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{where}: cannot read it ({e.strerror}); fix the path or leave GATEWAY_KEYS_FILE empty "
                          "for a gateway without keys") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    entries = data.get("keys")
    if not isinstance(entries, list) or not entries or set(data) != {"keys"}:
        raise ConfigError(f"{where}: expected only [[keys]] tables with name and sha256 (make one with "
                          "`python scripts/gateway_keys.py add <name>`)")
    lines = [n for n, line in enumerate(text.splitlines(), 1) if re.match(r"\s*\[\[\s*keys\s*\]\]", line)]
    keys: list[Key] = []
    for i, entry in enumerate(entries):
        at = f"{where} line {lines[i]}" if i < len(lines) else f"{where} key {i + 1}"
        key = _key(entry, at)
        if any(k.name == key.name for k in keys):
            raise ConfigError(f"{at}: the name {key.name!r} is taken by an earlier key; names must differ")
        if any(k.digest == key.digest for k in keys):
            raise ConfigError(f"{at}: the same sha256 as an earlier key; one key, one client")
        keys.append(key)
    return keys


def _key(entry: Any, at: str) -> Key:
    if not isinstance(entry, dict):
        raise ConfigError(f"{at}: a key is a [[keys]] table")
    if unknown := sorted(set(entry) - FIELDS):
        raise ConfigError(f"{at}: unknown field {unknown[0]!r}; a key has name, sha256, rpm, tpm and admin")
    name, digest = entry.get("name"), entry.get("sha256")
    if not isinstance(name, str) or not name.strip() or name == ANONYMOUS:
        raise ConfigError(f"{at}: name must be a non-empty string other than {ANONYMOUS!r}")
    if not isinstance(digest, str) or not HEX64.fullmatch(digest.lower()):
        raise ConfigError(f"{at}: sha256 must be the 64 hex digits of sha256(key), not the key itself")
    limits = []
    for limit in ("rpm", "tpm"):
        value = entry.get(limit, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{at}: {limit} must be a whole number ≥ 0 (0: unlimited), got {value!r}")
        limits.append(value)
    admin = entry.get("admin", False)
    if not isinstance(admin, bool):
        raise ConfigError(f"{at}: admin must be true or false, got {admin!r}")
    return Key(name.strip(), bytes.fromhex(digest), limits[0], limits[1], admin)


@dataclass
class Window:
    """One client's last 60 s: when its requests were admitted and the tokens its answers used."""

    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    token_sum: int = 0

    def prune(self, now: float) -> None:
        start = now - WINDOW_S
        while self.requests and self.requests[0] <= start:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= start:
            self.token_sum -= self.tokens.popleft()[1]

    def tokens_free_in(self, now: float, tpm: int) -> float:
        """Seconds until the window's tokens drop below `tpm`."""
        left = self.token_sum
        for ts, n in self.tokens:
            left -= n
            if left < tpm:
                return ts + WINDOW_S - now
        return 0.0


class Clients:
    """Who is asking (admit) and how much they used (used); without GATEWAY_KEYS_FILE everyone is let in."""

    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.metrics, self.clock = settings, metrics, clock
        self.keys = load_keys(settings.gateway_keys_file) if settings.gateway_keys_file else []
        self.by_name = {k.name: k for k in self.keys}
        self.windows = {k.name: Window() for k in self.keys if k.rpm or k.tpm}
        # what this process's jobs of ingested webhooks carry instead of a key (never leaves the process)
        self.internal = secrets.token_urlsafe(24)

    def admit(self, request: Request) -> str | None:
        """The client's name for this request (None without keys); raises BadRequest 401 for a missing or wrong
        key and Limited when its requests or tokens per minute are used up."""
        if not self.keys:
            return None
        if hmac.compare_digest(request.headers.get(INTERNAL, "").encode(), self.internal.encode()):
            return WEBHOOK  # a job that came in through POST /webhooks/ingest, its signature checked
        key = self.who(request)
        request.state.client = key.name  # so a refused request is counted under its client
        self.check(key)
        return key.name

    def who(self, request: Request) -> Key:
        """The key of this request (only with keys); raises BadRequest 401 for a missing or wrong one. Counts
        nothing against its limits."""
        given = bearer(request.headers) or request.headers.get("x-api-key", "").strip()
        if not given:
            raise p.BadRequest("missing_api_key", "this gateway needs an API key: send it as `Authorization: Bearer "
                               "<key>` (the openai client's api_key) or as `x-api-key`", status=401)
        key = self.identify(given)
        if key is None:
            raise p.BadRequest("invalid_api_key", "this API key is not one the gateway knows; check it, or ask the "
                               "gateway's operator for one", status=401)
        return key

    def is_admin(self, client: str | None) -> bool:
        """Whether the admitted client may load and unload models: any client when the gateway has no keys."""
        return not self.keys or (client in self.by_name and self.by_name[client].admin)

    def identify(self, given: str) -> Key | None:
        """The key whose digest matches, compared in constant time against every key (no early exit)."""
        digest = hashlib.sha256(given.encode()).digest()
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found

    def check(self, key: Key) -> None:
        """Admit one request of `key` within its limits or raise Limited."""
        window = self.windows.get(key.name)
        if window is None:
            return
        now = self.clock()
        window.prune(now)
        if key.rpm and len(window.requests) >= key.rpm:
            self.refuse(key, f"{key.rpm} requests per minute", window.requests[0] + WINDOW_S - now)
        if key.tpm and window.token_sum >= key.tpm:
            self.refuse(key, f"{key.tpm} tokens per minute", window.tokens_free_in(now, key.tpm))
        if key.rpm:
            window.requests.append(now)

    def refuse(self, key: Key, limit: str, wait: float) -> None:
        seconds = max(1, math.ceil(wait))
        if self.metrics is not None:
            self.metrics.rate_limited(key.name)
        raise Limited(f"{key.name} has used its {limit}; retry in {seconds} s", seconds)

    def used(self, client: str | None, tokens: int) -> None:
        """Count `tokens` (prompt + completion) against the client's tokens per minute."""
        key = self.by_name.get(client or "")
        window = self.windows.get(client or "")
        if key is None or window is None or not key.tpm or tokens <= 0:
            return
        now = self.clock()
        window.prune(now)
        window.tokens.append((now, tokens))
        window.token_sum += tokens
