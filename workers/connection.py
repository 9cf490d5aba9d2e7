"""The one NATS connection every process opens: workers, the monitor, the CLIs and the benchmarks.

Once connected it reconnects forever (`max_reconnect_attempts=-1`, 0.5 s apart) and stays quiet about the
refused attempts in between; the first connect, though, gives up after `timeout` with one `NatsUnavailable`
line that names the URL and the fix. With `max_reconnect_attempts=-1`, nats-py's own connect would otherwise
wait for a server forever.

A server that answers but refuses us is not worth waiting for: a refused login (Authorization Violation), a
certificate either side does not accept, or a server without TLS when TLS was asked for stop the first connect at
once with `NatsRefused`, one line naming the server and the settings to check. After that, the same refusals on a
reconnect are logged once each, and a denied publish or subscribe (Permissions Violation) is logged and recorded as
a `nats.permission` event while the connection stays up. URLs are shown only through `settings.redact`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from nats.aio.client import Client as NATS
from nats.errors import AuthorizationError, NoServersError, StaleConnectionError

from .settings import NatsAuth, creds_expiry, redact

__all__ = ["NATS", "EventSink", "NatsRefused", "NatsUnavailable", "connect", "redact"]

log = logging.getLogger(__name__)
_NO_TLS = "secure connection not available"
_DENIED = re.compile(r"permissions violation for (publish|subscription) to \"?([^\"\s]+)\"?", re.IGNORECASE)
_LOGIN = ("authorization violation", "authentication expired", "authentication revoked", "authentication timeout")


class NatsUnavailable(Exception):
    """No NATS server answered in time; the message names the URL, the wait and the fix."""


class NatsRefused(NatsUnavailable):
    """A server answered but refused this process (login, certificate, TLS); the message names what to check."""


class EventSink(Protocol):
    """Where connection changes are recorded (`workers.store.Store` is one)."""

    def event(self, code: str, msg: str = "", level: str = "info", **meta: Any) -> None: ...


class _Client(NATS):
    """nats-py's client, except that it never sends CONNECT (credentials) in clear when TLS was asked for: nats-py
    upgrades only when the server requires TLS, so a tls:// URL to a server without TLS would otherwise go plain."""

    wants_tls = False

    def _connect_command(self) -> bytes:
        websocket = self._current_server is not None and self._current_server.uri.scheme in ("ws", "wss")
        if self.wants_tls and not websocket and not self._server_info.get("tls_required"):
            raise ssl.SSLError(_NO_TLS)
        return super()._connect_command()


class _SslEofNoise(logging.Filter):
    # asyncio warns about a detail of its StreamReaderProtocol whenever a TLS peer closes; it means nothing here.
    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received()" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_SslEofNoise())


async def _quiet(e: Exception) -> None:
    # nats-py reports every failed (re)connect attempt here: the refused ones are expected, the rest get one line.
    if not isinstance(e, (ConnectionRefusedError, OSError, StaleConnectionError)):
        log.warning("nats: %s: %s", type(e).__name__, e)


def _server(nc: NATS, url: str) -> str:
    srv = nc._current_server
    return f"{srv.uri.scheme}://{srv.uri.hostname}:{srv.uri.port}" if srv is not None else redact(url)


def refusal(e: BaseException, nc: NATS, url: str, auth: NatsAuth) -> str | None:
    """The one line for a server that refused us (login, certificate, TLS), or None for any other error."""
    where, text = _server(nc, url), str(e).removeprefix("nats: ").strip("'")
    if isinstance(e, AuthorizationError) or any(w in text.lower() for w in _LOGIN):
        hint = auth.login_hint
        expiry = creds_expiry(auth.user_credentials) if auth.user_credentials else None
        if expiry is not None and expiry < time.time():
            when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(expiry))
            hint = f"the user JWT in {auth.creds_hint} expired at {when}"
        return f"NATS refused the login at {where} ({text or 'Authorization Violation'}); {hint}"
    if isinstance(e, ssl.SSLCertVerificationError):
        why = e.verify_message or text
        if "mismatch" in why:
            return (f"the certificate of the NATS server at {where} is not for that name ({why}); connect by a host "
                    f"name the certificate lists, or check {auth.ca_hint}")
        return (f"the certificate of the NATS server at {where} was not accepted ({why}); check {auth.ca_hint} "
                "(the CA that signed the server's certificate)")
    if isinstance(e, ssl.SSLError) and _NO_TLS in text:
        return (f"the NATS server at {where} does not offer TLS but tls:// or {auth.ca_hint} asks for it; enable "
                "`tls {}` on the server or connect with nats:// and no TLS settings")
    reason = str(getattr(e, "reason", None) or text)
    if "CERTIFICATE_REQUIRED" in reason or (wants_client_cert(nc) and isinstance(
            e, (ssl.SSLError, OSError, EOFError, StaleConnectionError))):
        if not auth.client_cert:
            return client_cert_required(nc, url, auth)
        return (f"the NATS server at {where} did not accept the client certificate ({reason}); check "
                f"{auth.cert_hint} (signed by a CA the server trusts?)")
    if isinstance(e, ssl.SSLError):
        return f"TLS with the NATS server at {where} failed ({reason}); check {auth.ca_hint} and {auth.cert_hint}"
    return None


def wants_client_cert(nc: NATS) -> bool:
    """The server said in its INFO that it verifies client certificates. When it refuses ours (or we sent none)
    nats-py sees a TLS alert or, as often, just the connection dropped after the handshake, or nothing at all."""
    return bool(nc._server_info.get("tls_verify"))


def client_cert_required(nc: NATS, url: str, auth: NatsAuth) -> str:
    return f"the NATS server at {_server(nc, url)} requires a client certificate (mutual TLS); set {auth.cert_hint}"


def denied(e: BaseException) -> tuple[str, str] | None:
    """(operation, subject) of a Permissions Violation the server reported, or None."""
    m = _DENIED.search(str(e))
    return (m[1].lower(), m[2]) if m else None


async def connect(url: str, *, name: str, timeout: float | None = None, events: EventSink | None = None,
                  on_disconnected: Callable[[], Awaitable[None]] | None = None,
                  on_reconnected: Callable[[], Awaitable[None]] | None = None,
                  reconnect: bool = True, auth: NatsAuth | None = None) -> NATS:
    """Connect to `url` (comma-separated for a cluster) as client `name`, with the credentials, TLS and inbox_prefix
    of `auth` (`NatsSettings.nats_auth()`; None: no credentials, TLS only where the server requires it, _INBOX).

    `timeout` bounds the first connect (None: wait for a server however long it takes); `events` records
    `nats.connected` / `nats.disconnected` / `nats.reconnected` / `nats.permission` / `nats.refused`;
    `reconnect=False` tries each server once and never reconnects (the CLIs). Raises `NatsRefused` when a server
    refused the login or TLS, `NatsUnavailable` when no server answered.
    """
    auth = auth or NatsAuth()
    nc = _Client()
    nc.wants_tls = auth.wants_tls
    shown = redact(url)
    connected = False
    reported: set[str] = set()

    def record(code: str, msg: str, level: str = "info", **meta: Any) -> None:
        if events is not None:
            events.event(code, msg, level=level, **meta)

    async def on_error(e: Exception) -> None:
        why = refusal(e, nc, url, auth)
        if why and not connected:
            raise NatsRefused(why)  # out of nats-py's connect loop, which would otherwise retry it forever
        if why:
            if why not in reported:  # a reconnect refused: once per reason, it repeats every half second
                reported.add(why)
                log.error("%s", why)
                record("nats.refused", why, level="error")
            return
        if op_subject := denied(e):
            op, subject = op_subject
            msg = (f'NATS denied {op} to "{subject}" (Permissions Violation) for {auth.identity}; allow it in the '
                   "server's permissions for that user")
            log.warning("%s", msg)
            record("nats.permission", msg, level="error", subject=subject, operation=op)
            return
        await _quiet(e)

    async def disconnected() -> None:
        if not connected:  # nats-py also calls this when a failed first connect is cleaned up
            return
        record("nats.disconnected", f"lost connection to {shown}", level="warning")
        if on_disconnected is not None:
            await on_disconnected()

    async def reconnected() -> None:
        reported.clear()
        record("nats.reconnected", f"reconnected to {_server(nc, url)}")
        if on_reconnected is not None:
            await on_reconnected()

    # A dict: nats-py annotates the two waits as int, but takes (and we want) fractions of a second.
    options: dict[str, Any] = {
        "servers": url.split(","),
        "name": name,
        "allow_reconnect": reconnect,
        "max_reconnect_attempts": -1 if reconnect else 0,
        "reconnect_time_wait": 0.5,
        "ping_interval": 20,
        "max_outstanding_pings": 3,
        "connect_timeout": min(2.0, timeout) if timeout else 2.0,
        "error_cb": on_error,
        "disconnected_cb": disconnected,
        "reconnected_cb": reconnected,
        **auth.options(),
    }
    try:
        await asyncio.wait_for(nc.connect(**options), timeout)
    except NatsRefused:
        await _close(nc)
        raise
    except (TimeoutError, OSError, NoServersError) as e:
        await _close(nc)
        if wants_client_cert(nc) and not auth.client_cert:  # dropped without an error error_cb could read
            raise NatsRefused(client_cert_required(nc, url, auth)) from None
        within = f" within {timeout:g} s" if timeout is not None else ""
        raise NatsUnavailable(f"no NATS server answered at {shown}{within} ({type(e).__name__}); "
                              "start one with `make nats` or set NATS_URL") from None
    except asyncio.CancelledError:
        await _close(nc)
        raise
    connected = True
    record("nats.connected", f"connected to {_server(nc, url)}", max_payload=nc.max_payload)
    return nc


async def _close(nc: NATS) -> None:
    # Bounded: after a failed TLS upgrade nats-py waits for the plain stream to close, which never happens (the
    # socket went to the TLS layer, and is already closed).
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), 0.5)
