"""The worker process: load one model, serve its queue, drain on SIGTERM. The lifecycle only; one
message's life is in `consumer.py`, one request's run in `runner.py`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.errors import APIError as JsApiError
from nats.js.errors import ServiceUnavailableError
from nats.js.kv import KeyValue

from . import formats
from . import protocol as p
from .answered import Answered, Attempts, ensure_answered
from .config import Settings
from .connection import connect, redact
from .consumer import Above, Consumer, in_flight_limit
from .engine import Engine
from .grammars import GrammarStore
from .healing import StreamGuard
from .httpapi import Server, build_app, server
from .httpkit import listen
from .metrics import Metrics
from .modelfile import ModelNotFound, load_failure, resolve
from .modelinfo import capabilities, model_info, offload_info
from .outcome import Ledger, Origin
from .queue import DeadLetters, Ingress, Replier, ensure_stream
from .runner import Runner
from .store import Store
from .streams import ensure_consumers
from .surface import Gate, ModelCard
from .telemetry import INSTANCE, Telemetry
from .window import Window

HTTP_STOP_WAIT_S = 5.0
CANCEL_NOT_FOUND_DELAY_S = 0.3  # an instance that does not know a cancelled request answers not_found after this
log = logging.getLogger(__name__)


class StartupError(Exception):
    """A failure the user must fix before the worker can run; printed as one line."""


@dataclass(frozen=True)
class Loaded:
    """Everything that exists once the model has loaded."""

    engine: Engine
    runner: Runner
    grammars: GrammarStore | None
    card: ModelCard


class Worker:
    """One model, one process.

    Start-up, in order: open the log; connect to NATS and make sure the queue exists; start telemetry
    (the `starting` heartbeat goes out before the model loads); start the HTTP API; load the model;
    serve (cancel subject, pull consumer, ingress, dead letters); go online. SIGTERM/SIGINT stop the
    ingress and the pulls, let in-flight requests finish for up to DRAIN_TIMEOUT, and hand anything
    unfinished back to JetStream for another worker. Every started part is stopped in reverse order.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store(settings.log_path, retention_days=settings.log_retention_days,
                           max_rows=settings.log_max_rows)
        self.metrics = Metrics(settings.model_name)
        self.ledger = Ledger(self.store, self.metrics, window=Window(settings.stats_window_s),
                             origin=Origin(settings.model_name, settings.model_kind, INSTANCE, settings.log_prompts))
        self.gate = Gate(in_flight_limit(settings) + settings.http_queue_limit)
        self.started_at = time.time()
        self.should_exit = asyncio.Event()
        self._status: p.WorkerStatus = "starting"
        self._nc: NATS | None = None
        self._loaded: Loaded | None = None
        self._consumer: Consumer | None = None
        self._guard: StreamGuard | None = None
        self._side_tasks: set[asyncio.Task[None]] = set()

    # --- what telemetry and the HTTP app see -------------------------------------------------

    @property
    def status(self) -> p.WorkerStatus:
        return self._status

    @property
    def active(self) -> int:
        return (len(self._consumer.in_flight) if self._consumer else 0) + self.gate.active

    @property
    def slots(self) -> p.SlotUsage | None:
        return self._loaded.engine.usage() if self._loaded else None

    @property
    def runner(self) -> Runner | None:
        return self._loaded.runner if self._loaded else None

    @property
    def grammars(self) -> GrammarStore | None:
        return self._loaded.grammars if self._loaded else None

    @property
    def card(self) -> ModelCard:
        return self._loaded.card if self._loaded else ModelCard()

    async def cancel(self, req_id: str) -> str:
        """DELETE /v1/requests/{id}: "running" (stopped), "queued" (removed from the queue, its caller told),
        "not_found" (no instance of the model has it), or "pending" (no instance answered: each remembers the
        cancel and skips the request if it comes)."""
        state = self._loaded.runner.cancel(req_id) if self._loaded else "queued"
        if self._nc is None:
            return "running" if state == "running" else "pending"
        s = self.settings
        subject, body = p.cancel_subject(s.model_kind, s.model_name), p.dumps(p.CancelRequest(req_id=req_id))
        if state == "running":  # stopped here; another instance may hold a copy (a redelivery)
            await self._nc.publish(subject, body)
            return state
        try:  # every instance hears it; the one that has the request answers first, the others not_found later
            reply = await self._nc.request(subject, body, timeout=CANCEL_NOT_FOUND_DELAY_S + 1.0)
        except Exception:
            return "pending"
        answer = p.loads(reply.data) if reply.data else {}
        if answer.get("cancelled"):
            return str(answer.get("state") or "running")
        return "not_found" if (answer.get("error") or {}).get("type") == "not_found" else "pending"

    # --- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        s = self.settings
        await self.store.open()
        self.store.event("startup", f"worker {s.worker_id} starting", model=s.model_name, kind=s.model_kind)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.should_exit.set)
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(self.store.close)
            stack.callback(lambda: self.store.event("shutdown", "worker stopped", processed=self.ledger.total_processed,
                                                    failed=self.ledger.total_failed))
            try:
                # 1. NATS, the stream and the model's durable consumers (one per priority)
                nc = self._nc = await connect(s.nats_url, name=s.worker_id, timeout=s.nats_connect_timeout,
                                              events=self.store, auth=s.nats_auth())
                stack.push_async_callback(_close, nc)
                js = nc.jetstream()
                durables, claims = await self._queue_ready(js)
                guard = self._guard = StreamGuard(nc, js, s, self.store, self.ledger.record)  # recreates them
                await guard.start()
                stack.push_async_callback(guard.stop)
                # 2. telemetry: health, heartbeats (`starting` goes out now), backpressure reports
                telemetry = Telemetry(nc, js, s, self.store, self, self.metrics, watch=guard)
                self.ledger.events = telemetry.publish_event  # each finished request on events.request.<model>
                await telemetry.start()
                stack.push_async_callback(telemetry.stop)
                # 3. the HTTP API (health and metrics answer while the model loads)
                await self._start_http(stack)
                # 4. the model
                self._loaded = loaded = await self._load()
                stack.callback(_close_engine, loaded.engine)
                # 5. serve: cancels, the pull consumer, the public subject, dead letters
                consumer, ingress = await self._serve(nc, js, durables, loaded.runner, telemetry, stack,
                                                      Answered(claims, s, self.store, live=telemetry.is_live))
                # 6. online until SIGTERM/SIGINT
                self._status = "online"
                self.metrics.ready.labels(s.model_name).set(1)
                await telemetry.heartbeat()
                subject = p.request_subject(s.model_kind, s.model_name)
                self.store.event("server.ready", f"serving {subject}")
                log.info("%s: ready on %s (worker %s, concurrency %d)", s.model_name, subject, s.worker_id,
                         s.worker_concurrency)
                await self.should_exit.wait()
                # 7. drain
                self._status = "draining"
                await telemetry.heartbeat()
                in_flight = len(consumer.in_flight)
                self.store.event("drain", f"draining {in_flight} in-flight request(s)", timeout=s.drain_timeout)
                log.info("%s: draining (%d in flight, up to %g s)", s.model_name, in_flight, s.drain_timeout)
                await ingress.stop()
                await consumer.drain(s.drain_timeout, loaded.engine.abort)
            finally:
                # 8. everything started above stops in reverse order, after the `stopping` status is set
                self._status = "stopping"
                self.metrics.ready.labels(s.model_name).set(0)

    async def _load(self) -> Loaded:
        s = self.settings
        spec = p.KINDS[s.model_kind]
        self.store.event("model.loading", f"resolving model {s.model_name}")
        path: Path | None = None
        try:
            path = await asyncio.to_thread(resolve, s)
            engine = Engine(path, embedding=not spec.generates, concurrency=s.worker_concurrency,
                            ctx_size=s.ctx_size, threads=s.model_threads, pooling=s.pooling,
                            default_max_tokens=s.default_max_tokens, normalize=s.embed_normalize,
                            embed_max_tokens=s.embed_token_cap, n_gpu_layers=s.n_gpu_layers,
                            flash_attn=s.flash_attn, main_gpu=s.main_gpu, tensor_split=s.gpu_split,
                            batched=s.engine == "batched", embed_batch_max=s.embed_batch_max,
                            kv_tokens=s.kv_cache_tokens)
            how = (f"1 context batching {s.worker_concurrency} sequences" if engine.batched
                   else f"1 context embedding up to {s.embed_batch_max} requests together" if engine.embedding
                   else f"{s.worker_concurrency} context(s)")
            log.info("%s: loading %s (%s, ctx %d) …", s.model_name, path.name, how, s.ctx_size)
            await engine.load()
        except ModelNotFound as e:
            self.store.event("model.failed", str(e), level="error")
            raise StartupError(str(e)) from None
        except (ValueError, RuntimeError, OSError) as e:
            why = load_failure(s, path, e)
            self.store.event("model.failed", why, level="error")
            raise StartupError(why) from None
        self.store.event("model.loaded", f"{path.name} loaded in {engine.load_seconds:.2f} s",
                         path=str(path), load_seconds=engine.load_seconds)
        self.metrics.load_seconds.labels(s.model_name).set(engine.load_seconds)
        fmt: formats.PromptFormat | None = None
        grammars: GrammarStore | None = None
        if spec.generates:
            try:
                fmt = formats.build(s.model_format, s, formats.ModelText(engine.metadata, **engine.special_tokens()))
            except formats.FormatError as e:
                engine.close()
                raise StartupError(str(e)) from None
            grammars = GrammarStore(s.data_dir / "grammars", engine.check_grammar, limits=s.limits)
        card = ModelCard(
            capabilities=capabilities(engine.metadata, kind=s.model_kind, grammars=grammars is not None),
            model_info=model_info(engine.metadata, n_params=engine.n_params, context_size=s.ctx_size,
                                  offload=offload_info(engine)),
        )
        runner = Runner(model_name=s.model_name, worker_id=s.worker_id, engine=engine, fmt=fmt, grammars=grammars,
                        sampling=s.sampling_defaults)
        return Loaded(engine, runner, grammars, card)

    async def _queue_ready(self, js: JetStreamContext) -> tuple[dict[int, str], KeyValue]:
        """The stream, the model's consumers and the claims bucket, made or found. A JetStream API that does not
        answer in time (a cluster electing leaders, a loaded machine: each R3 consumer is a Raft group of its own)
        is asked again for up to NATS_CONNECT_TIMEOUT; a refusal, or no JetStream at all, ends the start at once."""
        s = self.settings
        ends = time.monotonic() + s.nats_connect_timeout
        while True:
            try:
                await ensure_stream(js, s, self.store)
                durables = await ensure_consumers(js, s, self.store)
                claims, _ = await ensure_answered(js, s, self.store)
                return durables, claims
            except NatsTimeout as e:
                if time.monotonic() >= ends:
                    raise StartupError(_queue_failure(e, s.nats_url)) from None
                self.store.event("queue.setup_slow", "the JetStream API did not answer in time; asking again",
                                 level="warning")
                await asyncio.sleep(1.0)
            except JsApiError as e:
                raise StartupError(_queue_failure(e, s.nats_url)) from None

    async def _serve(self, nc: NATS, js: JetStreamContext, durables: dict[int, str], runner: Runner,
                     telemetry: Telemetry, stack: contextlib.AsyncExitStack, answered: Answered
                     ) -> tuple[Consumer, Ingress]:
        s = self.settings
        replier = Replier(nc, s)
        for subject in (p.cancel_subject(s.model_kind, s.model_name),
                        p.owner_cancel_subject(s.model_kind, "*", s.model_name)):
            cancels = await nc.subscribe(subject, cb=self._on_cancel)
            stack.push_async_callback(cancels.unsubscribe)
        psub = await js.pull_subscribe_bind(durable=durables[p.DEFAULT_PRIORITY], stream=p.STREAM_NAME)
        above = Above(nc, {pr: d for pr, d in durables.items() if pr != p.DEFAULT_PRIORITY},
                      {pr: p.queue_subject(s.model_kind, s.model_name, pr) for pr in p.PRIORITIES
                       if pr != p.DEFAULT_PRIORITY})
        consumer = self._consumer = Consumer(psub, settings=s, runner=runner, replier=replier, ledger=self.ledger,
                                             store=self.store, metrics=self.metrics, answered=answered,
                                             attempts=Attempts(answered.kv, s, self.store), above=above)
        await above.listen(consumer.wake)
        consumer.start()
        stack.push_async_callback(consumer.stop_pulling)
        ingress = Ingress(nc, js, s, self.ledger.record, queued=self._guard.queued if self._guard else None)
        await ingress.start(telemetry.stats_data)
        stack.push_async_callback(ingress.stop)
        dead_letters = DeadLetters(nc, js, s, self.store, self.ledger.record)
        await dead_letters.start()
        stack.push_async_callback(dead_letters.stop)
        await nc.flush()
        return consumer, ingress

    async def _on_cancel(self, msg: Msg) -> None:
        """A cancel on the model's subject (any request) or on an owner's subject (that owner's requests only)."""
        try:
            req_id = p.CancelRequest.model_validate_json(msg.data).req_id
        except ValueError:
            return
        s = self.settings
        owner = None if msg.subject == p.cancel_subject(s.model_kind, s.model_name) else msg.subject.split(".")[2]
        # running here: stopped. Otherwise remembered (skipped if it comes), and if this instance queued it and
        # no worker took it yet, removed from the stream with its caller told (StreamGuard.cancel_queued).
        state = self._loaded.runner.cancel(req_id, owner) if self._loaded else "queued"
        if state == "queued" and self._guard is not None:
            state = {"removed": "queued", "taken": "elsewhere", "refused": "refused"}.get(
                await self._guard.cancel_queued(req_id, owner) or "", "unknown")
        self.store.event("request.cancel", f"cancel {req_id} ({state})", req_id=req_id, state=state, owner=owner)
        if not msg.reply or not p.is_inbox(msg.reply, s.limits.reply_prefixes):
            return
        if state in ("running", "queued"):
            await msg.respond(p.json_bytes({"req_id": req_id, "cancelled": True, "state": state,
                                            "worker_id": s.worker_id}))
        elif state == "unknown":  # the instance that has it answers at once; this one only if nobody does
            task = asyncio.create_task(self._not_found(msg, req_id), name="cancel-not-found")
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)

    async def _not_found(self, msg: Msg, req_id: str) -> None:
        await asyncio.sleep(CANCEL_NOT_FOUND_DELAY_S)
        s = self.settings
        err = p.error_body(404, "not_found", f"no worker of {s.model_name} has request {req_id} queued or running "
                           "(it finished, expired, or never came); nothing was cancelled")
        body = {"req_id": req_id, "cancelled": False, "worker_id": s.worker_id, "error": err.model_dump()}
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.publish(msg.reply, p.json_bytes(body), headers=p.error_headers(err))

    async def _start_http(self, stack: contextlib.AsyncExitStack) -> None:
        addr = self.settings.http_host_port
        if addr is None:
            return
        try:
            sock = listen(*addr)
        except OSError as e:
            why = os.strerror(e.errno) if e.errno else str(e)
            raise StartupError(f"HTTP_ADDR {self.settings.http_addr}: cannot listen on port {addr[1]} ({why}); "
                               "stop what uses it, choose another HTTP_ADDR, or leave it empty") from None
        stack.callback(sock.close)
        http = server(build_app(self), *addr)
        task = asyncio.create_task(http.serve(sockets=[sock]), name="http")
        stack.push_async_callback(_stop_http, http, task)
        while not http.started:
            if task.done():
                raise StartupError(f"HTTP_ADDR {self.settings.http_addr}: the HTTP server did not start; "
                                   "choose another HTTP_ADDR or leave it empty")
            await asyncio.sleep(0.02)


async def _stop_http(http: Server, task: asyncio.Task[None]) -> None:
    http.should_exit = True
    with contextlib.suppress(Exception):
        await asyncio.wait_for(task, HTTP_STOP_WAIT_S)


def _queue_failure(e: Exception, url: str) -> str:
    """The one line for a NATS server that took the connection but not the queue (workers/streams.py)."""
    if isinstance(e, ServiceUnavailableError):
        return (f"the NATS server at {redact(url)} has no JetStream, which the queue needs; start nats-server with -js "
                "(`make nats` does) or set NATS_URL to one that has it")
    if isinstance(e, JsApiError):
        return (f"JetStream at {redact(url)} refused to set up the queue ({e.description or e}, code {e.err_code}); "
                "check the server's JetStream limits and STREAM_REPLICAS / QUEUE_MAX_PER_MODEL")
    return (f"the JetStream API at {redact(url)} did not answer; check that JetStream is enabled and that this NATS "
            "user may use $JS.API (NATS_URL and its credentials)")


async def _close(nc: NATS) -> None:
    if not nc.is_closed:
        with contextlib.suppress(Exception):
            await nc.drain()


def _close_engine(engine: Engine) -> None:
    if engine.busy == 0:  # threads still running after an abort keep their contexts
        engine.close()
