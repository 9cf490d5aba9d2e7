"""A small async client for the fleet: request, stream, cancel, discover. Used by nats-chat and nats-embed.

    async with FleetClient("nats://127.0.0.1:4222") as fleet:
        reply = await fleet.infer("gemma3-270m", {"input": "Hello"})
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from workers import discovery
from workers import protocol as p
from workers.connection import NATS, NatsUnavailable, connect
from workers.logsetup import setup_logging


class FleetError(Exception):
    """Something a user can act on; `str()` is one line, `exit_code` says which kind."""

    exit_code = 1


class NoServer(FleetError):
    exit_code = 2


class NoWorker(FleetError):
    exit_code = 3


class Timeout(FleetError):
    exit_code = 4


class ErrorReply(FleetError):
    exit_code = 5

    def __init__(self, body: dict[str, Any]) -> None:
        err = body.get("error") or {}
        super().__init__(f"the worker answered error {err.get('code')} {err.get('type')}: {err.get('message')}")
        self.body = body


class FleetClient:
    def __init__(self, url: str = "nats://127.0.0.1:4222", connect_timeout: float = 2.0) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self.nc: NATS | None = None

    async def __aenter__(self) -> FleetClient:
        try:
            self.nc = await connect(self.url, name="nats-cli", timeout=self.connect_timeout + 1, reconnect=False)
        except NatsUnavailable:
            raise NoServer(f"no NATS server at {self.url}; start the fleet with `make up` or pass -url") from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.nc is not None:
            await self.nc.close()

    def _nc(self) -> NATS:
        assert self.nc is not None, "use `async with FleetClient(...)`"
        return self.nc

    async def request(self, kind: p.Kind, model: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One request, one answer (what `nats req` does); raises FleetError subclasses."""
        subject = p.request_subject(kind, model)
        try:
            msg = await self._nc().request(subject, json.dumps(body).encode(), timeout=timeout)
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

    async def stream(self, model: str, body: dict[str, Any], timeout: float = 120) -> AsyncIterator[dict[str, Any]]:
        """Yield chunk messages `{req_id, index, delta}`, then the final response (`done: true`).

        `timeout` is the longest wait for the next message, not for the whole answer."""
        nc = self._nc()
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        subject = p.request_subject("inference", model)
        try:
            await nc.publish(subject, json.dumps({**body, "stream": True}).encode(), reply=inbox,
                             headers={"Fleet-Client": "nats-cli"})
            first = True
            while True:
                try:
                    msg = await sub.next_msg(timeout=timeout)
                except NatsTimeout:
                    raise Timeout(await self._timeout_message(model, timeout)) from None
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
            await sub.unsubscribe()

    async def cancel(self, model: str, req_id: str) -> None:
        await self._nc().publish(p.cancel_subject("inference", model), json.dumps({"req_id": req_id}).encode())
        await self._nc().flush()

    async def health(self, model: str, wait: float = 0.5) -> list[dict[str, Any]]:
        """Every instance's health body (they all answer)."""
        return await discovery.health(self._nc(), model, wait)

    async def discover(self, wait: float = 1.0) -> list[dict[str, Any]]:
        """Live instances, found through `$SRV.PING` and their health replies (gathered for `wait` s)."""
        return [json.loads(data) for data in await discovery.sweep(self._nc(), wait)]

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
    try:
        return asyncio.run(coro)
    except FleetError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
