"""One request to the fleet over NATS, as any caller sends it: to `<kind>.request.<model>`, with the deadline as
`Fleet-Timeout-Ms` and the caller's trace headers, so it is queued in JetStream and survives a worker restart.

The answer is one reply (`ask`) or, for `"stream": true`, chunk messages and then the final one (`open` →
`Stream`). `cancel` stops a request whose HTTP client went away. Every failure is a `protocol.BadRequest` whose
status is what the HTTP client gets: 404 for a model discovery never saw and nobody serves, 503 for a known model
without a live worker or no NATS, 504 when the deadline passes, 429 for a full queue, and the worker's own error
(status and type) otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from monitor.feed import Feed
from monitor.registry import Registry
from workers import protocol as p

# After the deadline the worker answers 504 `expired` itself; the gateway waits this much longer for that answer
# before it gives its own 504.
GRACE_S = 2.0
# What a worker's error type becomes at the gateway where its status alone says the wrong thing.
STATUS_OF = {"queue_full": 429}


@dataclass
class Call:
    """One fleet request: where it goes, its id (for the cancel and the worker's log) and its deadline."""

    kind: p.Kind
    model: str
    timeout_s: float
    headers: dict[str, str] = field(default_factory=dict)  # the caller's trace headers, passed through
    req_id: str = field(default_factory=p.new_req_id)

    @property
    def subject(self) -> str:
        return p.request_subject(self.kind, self.model)

    def nats_headers(self) -> dict[str, str]:
        return {**self.headers, p.H_TIMEOUT_MS: str(max(1, round(self.timeout_s * 1000)))}


def worker_error(err: Mapping[str, Any]) -> p.BadRequest:
    """A worker's error reply as the gateway's refusal: its status and type, a full queue as 429."""
    type_ = str(err.get("type") or "worker_error")
    code = err.get("code")
    status = STATUS_OF.get(type_) or (code if isinstance(code, int) and 400 <= code < 600 else 502)
    return p.BadRequest(type_, str(err.get("message") or "the worker answered with an error"), status=status)


def deadline_passed(call: Call) -> p.BadRequest:
    return p.BadRequest("deadline_exceeded", f"no answer from {call.model} within {call.timeout_s:g} s; send a "
                        "larger Fleet-Timeout-Ms, or retry when the queue is shorter", status=504)


class Fleet:
    """Requests over the connection of the in-process discovery feed; the registry tells 404 from 503."""

    def __init__(self, feed: Feed, registry: Registry) -> None:
        self.feed, self.registry = feed, registry
        self._detached: set[asyncio.Task[None]] = set()

    def nc(self) -> NATS:
        nc = self.feed.nc
        if nc is None or not nc.is_connected:
            raise p.BadRequest("nats_unavailable", "the gateway is not connected to NATS at the moment; retry in a "
                               "few seconds", status=503)
        return nc

    def absent(self, model: str) -> p.BadRequest:
        """Nobody answered the model's subject: unknown to discovery (404) or known without a live worker (503)."""
        if model not in self.registry.models:
            known = ", ".join(sorted(self.registry.models)) or "none yet"
            return p.BadRequest("model_not_found", f"no model named {model!r} is in the fleet (known: {known}); "
                                "GET /v1/models lists them", status=404)
        return p.BadRequest("no_worker", f"no worker of {model} is running; start one (make start WORKER={model}) "
                            "or retry when it is back", status=503)

    async def ask(self, call: Call, req: p.InferenceRequest | p.EmbeddingRequest) -> dict[str, Any]:
        """One request, one reply (its JSON); raises BadRequest."""
        nc = self.nc()
        try:
            msg = await nc.request(call.subject, p.dumps(req), timeout=call.timeout_s + GRACE_S,
                                   headers=call.nats_headers())
        except NoRespondersError:
            raise self.absent(call.model) from None
        except NatsTimeout:
            raise deadline_passed(call) from None
        return _checked(_json(msg.data))

    async def open(self, call: Call, req: p.InferenceRequest) -> Stream:
        """Send a streamed request and wait for its first message (so a refusal is still an HTTP status)."""
        nc = self.nc()
        sub = await nc.subscribe(nc.new_inbox())
        stream = Stream(self, call, sub, time.monotonic() + call.timeout_s + GRACE_S)
        try:
            await nc.publish(call.subject, p.dumps(req.model_copy(update={"stream": True})), reply=sub.subject,
                             headers=call.nats_headers())
            stream.first = await stream.next(first=True)
        except BaseException:
            self.detach(stream.close())
            raise
        return stream

    def cancel(self, call: Call) -> None:
        """Stop `call` on its worker (running or queued), without waiting: the HTTP client has gone. On the owner's
        cancel subject when this gateway's inboxes carry an owner (NATS_INBOX_PREFIX), else the model's."""
        nc = self.feed.nc
        if nc is None or not nc.is_connected:
            return
        owner = p.inbox_owner(nc.new_inbox())
        subject = (p.owner_cancel_subject(call.kind, owner, call.model) if owner
                   else p.cancel_subject(call.kind, call.model))
        self.detach(nc.publish(subject, p.dumps(p.CancelRequest(req_id=call.req_id))))

    def detach(self, aw: Any) -> None:
        """Run `aw` to its end even while the request that started it is being cancelled."""
        task = asyncio.ensure_future(_quietly(aw))
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)


class Stream:
    """A streamed answer: `first`, then `next()` until a message with `done`; `close()` when finished."""

    def __init__(self, fleet: Fleet, call: Call, sub: Subscription, ends: float) -> None:
        self.fleet, self.call, self.sub, self.ends = fleet, call, sub, ends
        self.first: dict[str, Any] = {}
        self.finished = False
        self.last_index = -1  # of the chunks passed on

    async def next(self, first: bool = False) -> dict[str, Any]:
        """The next message: a chunk `{req_id, index, delta}` or the final response (`done`); raises BadRequest.

        A worker killed mid-answer leaves the request to the next attempt, which streams it again from index 0:
        chunks up to the last index already passed on are skipped (at temperature 0 the second run is the same
        text; otherwise the client sees the first run's start and the second run's rest)."""
        while True:
            try:
                msg = await self.sub.next_msg(timeout=max(0.001, self.ends - time.monotonic()))
            except NatsTimeout:
                raise deadline_passed(self.call) from None
            if first and not msg.data and msg.headers and msg.headers.get("Status") == "503":
                self.finished = True
                raise self.fleet.absent(self.call.model)
            data = _json(msg.data)
            if data.get("done") or "delta" not in data:
                self.finished = True
                return _checked(data)
            index = data.get("index")
            if not isinstance(index, int) or index > self.last_index:
                self.last_index = index if isinstance(index, int) else self.last_index
                return data

    async def close(self) -> None:
        with contextlib.suppress(NatsError):
            await self.sub.unsubscribe()


def _json(data: bytes) -> dict[str, Any]:
    try:
        reply = json.loads(data)
    except ValueError:
        raise p.BadRequest("bad_gateway", "the worker's answer is not JSON; see its log (make logs)",
                           status=502) from None
    if not isinstance(reply, dict):
        raise p.BadRequest("bad_gateway", "the worker's answer is not a JSON object; see its log (make logs)",
                           status=502)
    return reply


def _checked(reply: dict[str, Any]) -> dict[str, Any]:
    if isinstance(err := reply.get("error"), dict):
        raise worker_error(err)
    return reply


async def _quietly(aw: Any) -> None:
    with contextlib.suppress(Exception):
        await aw
