"""Who may use an HTTP listener: the bearer key, and the rule for listeners other machines can reach.

As llama.cpp's `llama-server --api-key`: with API_KEY set, every worker route but `/healthz` and `/readyz`
needs `Authorization: Bearer <key>`. Without a key, a worker that listens beyond loopback keeps the routes that
change things (grammar writes, cancels, `/logs`) closed: anyone who can reach the port could otherwise use them.
The monitor uses `is_loopback` for its own warning.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable

from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes (orchestrators, load balancers) carry no key


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach: 127.0.0.0/8, ::1, localhost. All interfaces is not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def key_matches(given: str, key: str) -> bool:
    """Constant time: digests of equal length are compared, so neither the key nor its length leaks by timing."""
    return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(key.encode()).digest())


def bearer(headers: Headers) -> str | None:
    """The token of `Authorization: Bearer <token>` (scheme case-insensitive), or None."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def exposure(host: str, port: int, keyed: bool) -> str | None:
    """Why the mutating routes are closed (one sentence naming what to set), or None when they are open."""
    if keyed or is_loopback(host):
        return None
    return (f"this worker listens on {host}:{port}, beyond this machine, without an API key, so grammar changes, "
            f"cancels and /logs are off; set API_KEY (or API_KEY_FILE) or bind HTTP_ADDR=127.0.0.1:{port}")


class BearerAuth:
    """ASGI middleware: an HTTP request outside `open_paths` without the right bearer key gets `unauthorized()`.

    The key stays a `SecretStr` so no repr of the app or its middleware stack can show it.
    """

    def __init__(self, app: ASGIApp, key: SecretStr, unauthorized: Callable[[], Response],
                 open_paths: frozenset[str] = OPEN_PATHS) -> None:
        self.app, self.key, self.unauthorized, self.open_paths = app, key, unauthorized, open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            token = bearer(Headers(scope=scope))
            if token is None or not key_matches(token, self.key.get_secret_value()):
                await self.unauthorized()(scope, receive, send)
                return
        await self.app(scope, receive, send)
