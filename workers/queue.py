"""The durable queue between callers and workers (docs/architecture.md, "The request path").

The stream and consumer themselves are set up by workers/streams.py (re-exported here).
Ingress: each worker queue-subscribes the public request subject and copies every request,
with the caller's inbox and a deadline in headers, into a WorkQueue stream, replying only on
failure. Workers of one model share one durable pull consumer. Messages that exhaust
`max_deliver` are answered and removed by the dead-letter handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Callable
from typing import Any, Protocol

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

from . import protocol as p
from .config import Settings
from .outcome import Finished, Intake
from .store import Store
from .streams import ensure_consumer, ensure_stream

__all__ = ["DeadLetters", "Ingress", "Replier", "ensure_consumer", "ensure_stream", "header_bytes", "reply_in_payload",
           "reply_targets"]

Record = Callable[[Finished], None]  # Ledger.record: log row, metrics, totals


class Queued(Protocol):
    """Told of every queued request (stream seq, req_id, reply targets, deadline in epoch ms, priority):
    healing.StreamGuard.queued."""

    def __call__(self, seq: int, req_id: str, targets: list[str], deadline_ms: int, *,
                 priority: int = ...) -> None: ...
MAX_CALLER_HEADER_BYTES = 16 * 1024  # a caller's headers on a request; the queue keeps only CALLER_HEADERS

log = logging.getLogger(__name__)
ERR_MAX_PER_SUBJECT = 10077  # JSStreamStoreFailedF "maximum messages per subject exceeded"


def header_bytes(headers: dict[str, str] | None) -> int:
    """Size of a NATS header block as sent on the wire (`NATS/1.0\\r\\n` + `k: v\\r\\n`… + `\\r\\n`)."""
    if not headers:
        return 0
    return 12 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


class Replier:
    """Publishes replies with the payload+headers size guard (nats-py checks only the payload), and tells which
    answers found nobody listening (`send(..., watch=True)`, then `unheard` after a flush)."""

    def __init__(self, nc: NATS, settings: Settings) -> None:
        self.nc = nc
        self.settings = settings
        self._statuses: Subscription | None = None
        self._serial = itertools.count()
        self._missed: set[str] = set()  # watched reply subjects the server said nobody heard
        self._draining = asyncio.Lock()

    def error(self, req_id: str, status: int, type_: str, message: str,
              finish_reason: p.FinishReason = "error") -> tuple[bytes, dict[str, str]]:
        """An error reply in the model kind's response shape, with the ADR-32 error headers."""
        s = self.settings
        err = p.error_body(status, type_, message)
        body = p.KINDS[s.model_kind].error_response(req_id, s.model_name, s.worker_id, err, finish_reason)
        return p.dumps(body), p.error_headers(err)

    async def send(self, targets: list[str], data: bytes, headers: dict[str, str] | None = None,
                   req_id: str = "", watch: bool = False) -> dict[str, str]:
        """Publish to every target once. With `watch`, each copy carries a reply subject of this worker's own:
        the server answers a publish that no subscription matched with a 503 status there (no_responders, which
        nats-py asks for in CONNECT), ahead of the reply to a flush sent behind it; returns {reply: target}."""
        if len(data) + header_bytes(headers) > self.nc.max_payload:
            data, headers = self.error(req_id, 413, "response_too_large",
                                       f"the response is {len(data)} bytes, over the server's max_payload "
                                       f"{self.nc.max_payload}; ask for fewer tokens")
        sent: dict[str, str] = {}
        for subject in dict.fromkeys(targets):
            reply = await self._watch_subject() if watch else ""
            await self.nc.publish(subject, data, reply=reply, headers=headers or None)
            sent[reply] = subject
        return sent

    async def _watch_subject(self) -> str:
        if self._statuses is None:
            self._statuses = await self.nc.subscribe(self.nc.new_inbox() + ".*")
        return f"{self._statuses.subject[:-2]}.{next(self._serial)}"

    async def unheard(self, sent: dict[str, str]) -> list[str]:
        """The targets of `send(..., watch=True)` that nobody listened on; call after a flush confirmed it (the
        server's statuses are then already in this subscription's queue)."""
        async with self._draining:  # one reader: another request's answer may be waiting for its statuses too
            while self._statuses is not None and self._statuses.pending_msgs:
                status = await self._statuses.next_msg()
                if (status.headers or {}).get("Status") == "503":
                    self._missed.add(status.subject)
        missed = [target for reply, target in sent.items() if reply in self._missed]
        self._missed.difference_update(sent)
        return missed


def reply_targets(*candidates: str | None, prefixes: tuple[str, ...] = p.REPLY_PREFIXES) -> list[str]:
    """Where answers may go: the caller's inboxes, each once. Only `_INBOX.…` subjects (REPLY_PREFIXES): a caller
    must not be able to make a worker publish on a subject of the fleet's own (a heartbeat, a report, a queue, a
    request subject, `$JS.API…`) by naming it as its reply subject or `reply_to`."""
    return [c for c in dict.fromkeys(candidates) if c and p.is_inbox(c, prefixes)]


def caller_headers(headers: dict[str, str] | None) -> dict[str, str]:
    """The headers of a caller's request that travel with it through the queue: its timeout and trace ids
    (`traceparent`'s trace id becomes the Fleet-Trace-Id when none is given). Anything else is dropped, so a
    caller cannot set JetStream's own (`Nats-…`) or the fleet's routing headers."""
    headers = headers or {}
    size = header_bytes(headers)
    if size > MAX_CALLER_HEADER_BYTES:
        raise p.BadRequest("headers_too_large", f"the request's headers are {size} bytes; the limit is "
                           f"{MAX_CALLER_HEADER_BYTES}: send the input in the body", status=413)
    kept = {k: v for k, v in headers.items() if k in p.CALLER_HEADERS}
    if (trace := p.trace_id(kept)) is not None:
        kept[p.H_TRACE_ID] = trace
    if p.H_TIMEOUT_MS in kept and _int(kept, p.H_TIMEOUT_MS) is None:
        raise p.BadRequest("invalid_header", f"{p.H_TIMEOUT_MS} is a whole number of milliseconds above 0")
    return kept


class Ingress:
    """Turns public core requests into queued JetStream messages; replies only when it cannot queue."""

    def __init__(self, nc: NATS, js: JetStreamContext, settings: Settings, record: Record,
                 queued: Queued | None = None) -> None:
        self.nc, self.js, self.settings, self.record = nc, js, settings, record
        self.queued = queued
        self.replier = Replier(nc, settings)
        self.limits = settings.limits
        self.subjects = {pr: p.queue_subject(settings.model_kind, settings.model_name, pr) for pr in p.PRIORITIES}
        self.service: Any = None

    async def start(self, stats: Callable[[Any], Any]) -> None:
        """Serve the public subject as an ADR-32 endpoint, so `$SRV.PING/INFO/STATS` list this instance."""
        from nats.micro import add_service

        s = self.settings
        self.service = await add_service(
            self.nc, name=p.service_name(s.model_name), version=p.VERSION,
            description=f"{s.model_kind} worker for {s.model_name}",
            metadata={"model": s.model_name, "kind": s.model_kind, "worker_id": s.worker_id},
            stats_handler=stats,
        )
        await self.service.add_endpoint(
            name="request", subject=p.request_subject(s.model_kind, s.model_name),
            queue_group=p.ingress_group(s.model_kind, s.model_name), handler=lambda req: self.handle(req._msg),
            metadata={"model": s.model_name, "kind": s.model_kind},
        )

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.stop()
            self.service = None

    async def handle(self, msg: Msg) -> None:
        received = p.now_ms()
        req_id = ""
        payload_reply: str | None = None
        try:
            if len(msg.data) > self.settings.max_request_bytes:
                raise p.BadRequest("payload_too_large", f"request is {len(msg.data)} bytes; the limit is "
                                   f"{self.settings.max_request_bytes} (MAX_REQUEST_BYTES)", status=413)
            headers = caller_headers(msg.headers)
            req = p.parse_request(self.settings.model_kind, msg.data, self.limits)
            req_id = req.req_id or p.new_req_id()
            payload_reply = req.reply_to
            p.check_reply_to(msg.reply or None, self.limits.reply_prefixes)
            timeout_ms = req.timeout_ms or _int(headers, p.H_TIMEOUT_MS) or self.settings.default_timeout_ms
            priority = p.priority_of(headers, req.priority)
            deadline = received + timeout_ms
            headers.update({
                p.H_REQ_ID: req_id,
                p.H_MSG_ID: req_id,  # a retry of this req_id within the stream's duplicate window is one job
                p.H_ENQUEUED_AT: str(received),
                p.H_DEADLINE: str(deadline),
                p.H_INGRESS: self.settings.worker_id,
                p.H_PRIORITY: str(priority),
            })
            if msg.reply:
                headers[p.H_REPLY_TO] = msg.reply
            if len(msg.data) + header_bytes(headers) > self.nc.max_payload:
                raise p.BadRequest("payload_too_large", "request plus routing headers exceeds the server's "
                                   f"max_payload ({self.nc.max_payload} bytes); send a smaller input", status=413)
            ack = await self.js.publish(self.subjects[priority], msg.data, headers=headers, timeout=5.0)
            if ack.duplicate:
                raise p.BadRequest("duplicate_request", f"req_id {req_id} is queued or was answered already (in "
                                   "the last 2 minutes); its answer goes to the first request's reply subject. "
                                   "Send a new req_id to run it again", status=409)
            if self.queued is not None:
                self.queued(ack.seq, req_id, reply_targets(msg.reply, payload_reply,
                                                            prefixes=self.limits.reply_prefixes), deadline,
                            priority=priority)
        except p.BadRequest as e:
            await self._reject(msg, req_id, payload_reply, e.status, e.type, e.message)
        except APIError as e:
            if e.err_code == ERR_MAX_PER_SUBJECT:
                await self._reject(msg, req_id, payload_reply, 503, "queue_full",
                                   f"the queue for {self.settings.model_name} is full "
                                   f"({self.settings.queue_max_per_model} waiting); retry later or add workers")
            else:
                await self._reject(msg, req_id, payload_reply, 503, "queue_unavailable",
                                   f"JetStream refused the request ({e.description}); retry later")
        except (NoRespondersError, NoStreamResponseError, NatsTimeoutError, TimeoutError):
            await self._reject(msg, req_id, payload_reply, 503, "queue_unavailable",
                               "JetStream is not available; retry in a few seconds")
        except Exception as e:  # a bug of ours: the contract's 500, logged once, and the ingress keeps serving
            log.exception("ingress: unexpected error for %s", req_id or "a request")
            await self._reject(msg, req_id, payload_reply, 500, "internal_error",
                               f"internal error ({type(e).__name__}); see the worker log (make logs)")

    async def _reject(self, msg: Msg, req_id: str, payload_reply: str | None, status: int, type_: str,
                      message: str) -> None:
        req_id = req_id or _req_id_guess(msg.data)
        data, headers = self.replier.error(req_id, status, type_, message)
        try:
            trace = p.trace_id(msg.headers or {})
        except p.BadRequest:
            trace = None
        if trace:
            headers[p.H_TRACE_ID] = trace
        targets = reply_targets(msg.reply, payload_reply, prefixes=self.limits.reply_prefixes)
        with contextlib.suppress(Exception):  # disconnected: nobody can be told
            await self.replier.send(targets, data, headers, req_id)
        intake = Intake(req_id=req_id, worker_id=self.settings.worker_id, trace_id=trace,
                        raw_input=msg.data[:4096].decode(errors="replace"), deliveries=0)
        self.record(Finished.refused(intake, p.BadRequest(type_, message, status)))


class DeadLetters:
    """Answers and removes messages that JetStream stopped delivering after `max_deliver` attempts."""

    def __init__(self, nc: NATS, js: JetStreamContext, settings: Settings, store: Store, record: Record) -> None:
        self.nc, self.js, self.settings, self.store, self.record = nc, js, settings, store, record
        self.replier = Replier(nc, settings)
        self._subs: list[Any] = []

    @property
    def subjects(self) -> list[str]:
        """JetStream's max-deliveries advisory of each of the model's consumers (one per priority)."""
        s = self.settings
        return [f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{p.STREAM_NAME}."
                f"{p.consumer_name(s.model_kind, s.model_name, pr)}" for pr in p.PRIORITIES]

    async def start(self) -> None:
        group = "deadletter-" + p.token(self.settings.model_name)
        self._subs = [await self.nc.subscribe(subject, queue=group, cb=self.handle) for subject in self.subjects]

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs = []

    async def handle(self, advisory: Msg) -> None:
        try:
            info = json.loads(advisory.data)
            seq = int(info["stream_seq"])
            deliveries = int(info.get("deliveries", self.settings.queue_max_deliver))
            stored = await self.js.get_msg(p.STREAM_NAME, seq)
        except NotFoundError:
            return  # another worker handled it already
        except Exception as e:
            self.store.event("request.dead_letter", f"could not read dead-letter advisory: {e}", level="error")
            return
        headers = stored.headers or {}
        req_id = headers.get(p.H_REQ_ID) or _req_id_guess(stored.data or b"")
        message = (f"the request failed {deliveries} times and was removed from the queue; "
                   "see the worker log (make logs) and retry")
        data, err_headers = self.replier.error(req_id, 500, "dead_letter", message)
        payload_reply = reply_in_payload(stored.data or b"")
        await self.replier.send(reply_targets(headers.get(p.H_REPLY_TO), payload_reply,
                                              prefixes=self.settings.limits.reply_prefixes), data, err_headers, req_id)
        try:
            await self.js.delete_msg(p.STREAM_NAME, seq)
        except NotFoundError:
            pass
        intake = Intake(req_id=req_id, worker_id=self.settings.worker_id, trace_id=headers.get(p.H_TRACE_ID),
                        raw_input=(stored.data or b"")[:4096].decode(errors="replace"), deliveries=deliveries)
        self.record(Finished.dead_letter(intake, message))
        self.store.event("request.dead_letter", message, level="error", req_id=req_id, stream_seq=seq)


def _int(headers: dict[str, str] | None, key: str) -> int | None:
    try:
        value = int((headers or {}).get(key, ""))
    except ValueError:
        return None
    return value if value > 0 else None


def _req_id_guess(data: bytes) -> str:
    """The caller's req_id from a body that may not parse, when it is a valid one; else a new one."""
    obj = _object(data)
    value = obj.get("req_id")
    return value if isinstance(value, str) and p.REQ_ID.match(value) else p.new_req_id()


def reply_in_payload(data: bytes) -> str | None:
    value = _object(data).get("reply_to")
    return value if isinstance(value, str) else None


def _object(data: bytes) -> dict[str, Any]:
    try:
        obj = p.loads(data)
    except p.BadRequest:
        return {}
    return obj if isinstance(obj, dict) else {}
