"""A small async client for the fleet: request, stream, cancel, discover. Used by nats-chat and nats-embed.

    async with FleetClient("nats://127.0.0.1:4222") as fleet:
        reply = await fleet.infer("gemma3-270m", {"input": "Hello"})

The CLIs take the NATS connection as the `nats` CLI spells it (`--server`, `--user`, `--creds`, `--tlsca` …, see
`add_connection_flags`), each flag falling back to the same environment variable the workers read.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import re
import sys
import time
from collections.abc import AsyncGenerator, Awaitable, Coroutine
from typing import Any, NoReturn, TypeVar

from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from pydantic import ValidationError

from workers import discovery
from workers import protocol as p
from workers.connection import NATS, NatsRefused, NatsUnavailable, connect
from workers.logsetup import setup_logging
from workers.settings import NatsAuth, NatsSettings, config_error, redact

T = TypeVar("T")
# flag -> setting, as the Go `nats` CLI names them; the hints in error lines name both
FLAGS = {"server": "NATS_URL", "user": "NATS_USER", "password": "NATS_PASSWORD", "token": "NATS_TOKEN",
         "creds": "NATS_CREDS", "nkey": "NATS_NKEY_SEED_FILE", "tlscert": "NATS_TLS_CERT", "tlskey": "NATS_TLS_KEY",
         "tlsca": "NATS_TLS_CA", "inbox_prefix": "NATS_INBOX_PREFIX"}


class FleetError(Exception):
    """Something a user can act on; `str()` is one line, `exit_code` says which kind."""

    exit_code = 1


class NoServer(FleetError):
    exit_code = 2


class NoWorker(FleetError):
    exit_code = 3


class Timeout(FleetError):
    exit_code = 4


class NotAllowed(FleetError):
    """NATS refused the login, the TLS handshake, or a publish/subscribe (permissions)."""

    exit_code = 6


class ErrorReply(FleetError):
    exit_code = 5

    def __init__(self, body: dict[str, Any]) -> None:
        err = body.get("error") or {}
        super().__init__(f"the worker answered error {err.get('code')} {err.get('type')}: {err.get('message')}")
        self.body = body


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are one stderr line and exit code 2, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration(text: str) -> float:
    """Seconds from `30`, `1.5` (plain seconds) or a Go duration as the `nats` CLI takes it (`500ms`, `3s`,
    `2m`, `1h30m`); must be more than zero."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise argparse.ArgumentTypeError(f"bad duration {text!r}: give seconds (30) or a Go duration "
                                             "(500ms, 3s, 2m)") from None
        seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: it must be more than zero")
    return seconds


def add_connection_flags(ap: argparse.ArgumentParser) -> None:
    """The NATS connection flags, named as the `nats` CLI names them; unset ones come from the environment."""
    g = ap.add_argument_group("NATS connection (default: the environment variable in brackets)")
    g.add_argument("-s", "--server", "-url", "--url", dest="server", metavar="URL",
                   help="NATS server URL(s), comma-separated; user:password@ allowed [NATS_URL]")
    g.add_argument("--user", help="user name [NATS_USER]")
    g.add_argument("--password", help="password [NATS_PASSWORD]")
    g.add_argument("--token", help="token [NATS_TOKEN]")
    g.add_argument("--creds", metavar="FILE", help="user credentials file, JWT [NATS_CREDS]")
    g.add_argument("--nkey", metavar="FILE", help="user nkey seed file [NATS_NKEY_SEED_FILE]")
    g.add_argument("--tlscert", metavar="FILE", help="client certificate for mutual TLS [NATS_TLS_CERT]")
    g.add_argument("--tlskey", metavar="FILE", help="private key of --tlscert [NATS_TLS_KEY]")
    g.add_argument("--tlsca", metavar="FILE", help="CA that signed the server's certificate [NATS_TLS_CA]")
    g.add_argument("--inbox-prefix", dest="inbox_prefix", metavar="PREFIX",
                   help="subject prefix for replies, e.g. _INBOX.alice [NATS_INBOX_PREFIX]")


def nats_settings(args: argparse.Namespace) -> NatsSettings:
    """The connection settings from the flags, each unset one from the environment; a bad one is a FleetError."""
    given = {setting.lower(): value for flag, setting in FLAGS.items() if (value := getattr(args, flag, None))}
    try:
        return NatsSettings(**given)
    except ValidationError as e:
        raise FleetError(str(config_error(e, "in the flags or the environment"))) from None


def client_for(args: argparse.Namespace) -> FleetClient:
    """A FleetClient connecting as the flags and the environment say."""
    s = nats_settings(args)
    return FleetClient(s.nats_url, auth=s.nats_auth({v: "--" + k.replace("_", "-") for k, v in FLAGS.items()}))


class FleetClient:
    def __init__(self, url: str = "nats://127.0.0.1:4222", connect_timeout: float = 2.0,
                 auth: NatsAuth | None = None) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self.auth = auth
        self.nc: NATS | None = None
        self._interrupt: asyncio.Future[FleetError] | None = None

    async def __aenter__(self) -> FleetClient:
        self._interrupt = asyncio.get_running_loop().create_future()
        try:
            self.nc = await connect(self.url, name="nats-cli", timeout=self.connect_timeout + 1, reconnect=False,
                                    auth=self.auth, events=self, on_disconnected=self._lost)
        except NatsRefused as e:
            raise NotAllowed(str(e)) from None
        except NatsUnavailable:
            raise NoServer(f"no NATS server at {redact(self.url)}; start it with `make up`, or pass --server URL"
                           ) from None
        return self

    def event(self, code: str, msg: str = "", level: str = "info", **meta: Any) -> None:
        """The connection's EventSink: a publish or subscribe NATS denied ends what is waiting on it."""
        if code == "nats.permission":
            self._stop_waiting(NotAllowed(msg))

    async def _lost(self) -> None:
        self._stop_waiting(NoServer("the connection to NATS was lost while waiting for the answer; a worker may "
                                    "still run the request, but this client cannot receive it: retry"))

    def _stop_waiting(self, error: FleetError) -> None:
        if self._interrupt is not None and not self._interrupt.done():
            self._interrupt.set_result(error)

    async def _unless_denied(self, aw: Awaitable[T]) -> T:
        """`aw`, unless NATS denies one of our publishes or subscriptions or the connection drops first (then
        NotAllowed or NoServer at once, rather than a timeout much later)."""
        task = asyncio.ensure_future(aw)
        interrupt = self._interrupt
        if interrupt is None:
            return await task
        both: list[asyncio.Future[Any]] = [task, interrupt]
        try:
            await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # Ctrl+C: the wait goes with us, or it fails later (ConnectionClosedError) where nobody awaits it
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self._interrupt = asyncio.get_running_loop().create_future()  # an interactive session goes on
        raise interrupt.result()

    async def __aexit__(self, *exc: object) -> None:
        """Close in order: nothing waits on the connection any more, then its subscriptions go with it (a
        subscription closed after the connection raised ConnectionClosedError in a task nobody awaited)."""
        if self._interrupt is not None and not self._interrupt.done():
            self._interrupt.cancel()
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(NatsError, OSError):
                await self.nc.close()

    def _nc(self) -> NATS:
        assert self.nc is not None, "use `async with FleetClient(...)`"
        return self.nc

    def _connected(self) -> NATS:
        """The connection, if it is up: a request published on a dead connection would only wait out its
        timeout, so say so now."""
        nc = self._nc()
        if not nc.is_connected:
            raise NoServer("the connection to NATS is down; the request was not sent: check the server (make up) "
                           "and retry")
        return nc

    async def request(self, kind: p.Kind, model: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One request, one answer (what `nats req` does); raises FleetError subclasses."""
        subject = p.request_subject(kind, model)
        try:
            msg = await self._unless_denied(self._connected().request(subject, json.dumps(body).encode(),
                                                                      timeout=timeout, headers=deadline(timeout)))
        except NoRespondersError:
            raise NoWorker(_no_worker(subject, model)) from None
        except NatsTimeout:
            raise Timeout(await self._timeout_message(model, timeout)) from None
        reply = json.loads(msg.data)
        if reply.get("error"):
            raise ErrorReply(reply)
        return reply

    async def infer(self, model: str, body: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
        return await self.request("inference", model, body, timeout)

    async def embed(self, model: str, texts: list[str], timeout: float = 120) -> dict[str, Any]:
        return await self.request("embedding", model, {"input": texts}, timeout)

    async def stream(self, model: str, body: dict[str, Any], timeout: float = 120
                     ) -> AsyncGenerator[dict[str, Any], None]:
        """Yield chunk messages `{req_id, index, delta}`, then the final response (`done: true`).

        `timeout` is for the whole answer, as for `infer`: the worker gets it as the request's deadline and stops
        generating when it passes, so a caller who gave up costs nothing. Use with `contextlib.aclosing`."""
        nc = self._connected()
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        subject = p.request_subject("inference", model)
        ends = time.monotonic() + timeout
        try:
            await nc.publish(subject, json.dumps({**body, "stream": True}).encode(), reply=inbox,
                             headers=deadline(timeout))
            first = True
            while True:
                try:
                    msg = await self._unless_denied(sub.next_msg(timeout=max(0.001, ends - time.monotonic())))
                except NatsTimeout:
                    if first:
                        raise Timeout(await self._timeout_message(model, timeout)) from None
                    raise Timeout(f"the answer from {model} did not finish within {timeout:g} s; the worker stopped "
                                  "it: raise -timeout") from None
                if first and msg.headers and msg.headers.get("Status") == "503":
                    raise NoWorker(_no_worker(subject, model))
                first = False
                data = json.loads(msg.data)
                if data.get("error"):
                    raise ErrorReply(data)
                yield data
                if data.get("done") or "delta" not in data:
                    return
        finally:
            with contextlib.suppress(NatsError):  # the connection may be closed already (Ctrl+C, a server gone)
                await sub.unsubscribe()

    async def cancel(self, model: str, req_id: str) -> None:
        """Cancel one of our requests: on our own owner subject when our inboxes carry an owner (`--inbox-prefix
        _INBOX.<user>`, what a least-privilege server grants), else on the model's open cancel subject."""
        owner = p.inbox_owner(self._nc().new_inbox())
        subject = p.owner_cancel_subject("inference", owner, model) if owner else p.cancel_subject("inference", model)
        await self._nc().publish(subject, json.dumps({"req_id": req_id}).encode())
        await self._unless_denied(self._nc().flush())

    async def health(self, model: str, wait: float = 0.5) -> list[dict[str, Any]]:
        """Every instance's health body (they all answer)."""
        return await self._unless_denied(discovery.health(self._nc(), model, wait))

    async def discover(self, wait: float = 1.0) -> list[dict[str, Any]]:
        """Live instances, found through `$SRV.PING` and their health replies (gathered for `wait` s)."""
        return [json.loads(data) for data in await self._unless_denied(discovery.sweep(self._nc(), wait))]

    async def _timeout_message(self, model: str, timeout: float) -> str:
        depth = ""
        try:
            health = await self.health(model, 0.3)
            if health:
                q = health[0]["queue_metrics"]
                depth = f"; {q['pending_messages']} request(s) queued, {q['active_processing']} running on one worker"
        except Exception:
            pass
        return f"no answer from {model} within {timeout:g} s{depth}; raise -timeout or try later"


def deadline(timeout: float) -> dict[str, str]:
    """The caller's timeout as a request header: the worker drops the request once it passes (the caller has gone)."""
    return {p.H_TIMEOUT_MS: str(max(1, round(timeout * 1000)))}


def _no_worker(subject: str, model: str) -> str:
    return f"no worker is serving {subject}; start one with `make start WORKER={model}`"


def model_from_subject(subject: str | None, kind: p.Kind, default: str) -> str:
    """`-subject inference.request.X` → X (the Go tool's flag); no subject → the -m default."""
    if not subject:
        return default
    prefix = f"{kind}.request."
    if not subject.startswith(prefix):
        raise FleetError(f"-subject must start with {prefix}")
    return subject[len(prefix):]


def run_cli(prog: str, coro: Coroutine[Any, Any, int]) -> int:
    """Run a CLI's coroutine; a FleetError becomes one unwrapped stderr line and its exit code."""
    setup_logging()
    # what the connection would log (a denied publish, say) reaches the user as this command's one error line
    logging.getLogger("workers.connection").setLevel(logging.CRITICAL)
    try:
        return asyncio.run(coro)
    except FleetError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
