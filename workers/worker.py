"""The worker process: load one model, pull its queue, answer callers, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from . import protocol as p
from .config import Settings
from .connection import connect
from .engine import Engine
from .grammars import GrammarStore
from .httpapi import build_app, server
from .metrics import Metrics
from .modelfile import ModelNotFound, resolve
from .modelinfo import capabilities, model_info
from .prompts import CHATML_STOP, HARMONY_STOP, Harmony, Renderer, Template, TemplateError, chatml, gguf_chat
from .queue import DeadLetters, Ingress, Replier, ensure_consumer, ensure_stream, reply_targets
from .runner import DeltaPump, Runner
from .store import Store
from .telemetry import Telemetry

FETCH_WAIT_S = 5.0


class StartupError(Exception):
    """A failure the user must fix before the worker can run; printed as one line."""


class Worker:
    """One model, one process.

    Lifecycle: open the log, connect to NATS, load the model, then take requests from the
    model's durable consumer with at most `WORKER_CONCURRENCY` in flight. SIGTERM/SIGINT stop
    the ingress and the pulls, let in-flight requests finish for up to `DRAIN_TIMEOUT`, and
    hand anything unfinished back to JetStream for another worker.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store(settings.log_path, retention_days=settings.log_retention_days,
                           max_rows=settings.log_max_rows)
        self.status = "starting"
        self.started_at = time.time()
        self.should_exit = asyncio.Event()
        self.nc: NATS | None = None
        self.js: JetStreamContext | None = None
        self.engine: Engine | None = None
        self.template: Template | None = None
        self.runner: Runner | None = None
        self.grammars: GrammarStore | None = None
        self.in_flight: dict[asyncio.Task[None], Msg] = {}
        self.slots = asyncio.Semaphore(settings.worker_concurrency)
        self.total_processed = 0
        self.total_failed = 0
        self.last_processed_at: float | None = None
        self.model_info: dict[str, Any] = {}
        self.capabilities: list[str] = []
        self.aborted = False
        self.metrics = Metrics(settings.model_name)
        self.telemetry: Telemetry | None = None
        self.http: Any = None
        self.http_gate: Any = None  # set by the HTTP routes: counts HTTP requests in progress
        self._http_task: asyncio.Task[None] | None = None

    @property
    def active(self) -> int:
        return len(self.in_flight) + (self.http_gate.active if self.http_gate else 0)

    def record(self, row: dict[str, Any]) -> None:
        """A finished request: its log row, its metrics, this instance's totals."""
        self.store.request(**row)
        self.metrics.observe(row)
        if row.get("status") == "ok":
            self.total_processed += 1
            self.last_processed_at = time.time()
        elif row.get("status") != "handed_back":
            self.total_failed += 1

    # --- lifecycle ---------------------------------------------------------------

    async def run(self) -> None:
        s = self.settings
        await self.store.open()
        self.store.event("startup", f"worker {s.worker_id} starting", model=s.model_name, kind=s.model_kind)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.should_exit.set)
        try:
            await self._start()
            self.status = "online"
            self.metrics.ready.labels(s.model_name).set(1)
            assert self.telemetry is not None
            await self.telemetry.heartbeat()
            self.store.event("server.ready", f"serving {p.request_subject(s.model_kind, s.model_name)}")
            _say(f"{s.model_name}: ready on {p.request_subject(s.model_kind, s.model_name)} "
                 f"(worker {s.worker_id}, concurrency {s.worker_concurrency})")
            pull = asyncio.create_task(self._pull_loop(), name="pull")
            await self.should_exit.wait()
            await self._drain(pull)
        finally:
            self.status = "stopping"
            self.metrics.ready.labels(s.model_name).set(0)
            if self.telemetry is not None:
                with contextlib.suppress(Exception):
                    await self.telemetry.stop()
            if self.http is not None:
                self.http.should_exit = True
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._http_task, 5)  # type: ignore[arg-type]
            self.store.event("shutdown", "worker stopped", processed=self.total_processed, failed=self.total_failed)
            if self.nc is not None and not self.nc.is_closed:
                with contextlib.suppress(Exception):
                    await self.nc.drain()
            if self.engine is not None and self.engine.busy == 0:
                self.engine.close()
            await self.store.close()

    async def _start(self) -> None:
        s = self.settings
        if s.model_kind == "inference" and s.model_format == "template":
            try:
                self.template = Template.load(s.template_path)
            except TemplateError as e:
                raise StartupError(str(e)) from None
        self.nc = await connect(s, self.store)
        self.js = self.nc.jetstream()
        await ensure_stream(self.js, s)
        durable = await ensure_consumer(self.js, s)
        self.telemetry = Telemetry(self.nc, self.js, s, self.store, self, self.metrics)
        await self.telemetry.start()  # the `starting` heartbeat goes out before the model loads
        await self._start_http()
        self.store.event("model.loading", f"resolving model {s.model_name}")
        try:
            path = await asyncio.to_thread(resolve, s)
            self.engine = Engine(
                path, kind=s.model_kind, concurrency=s.worker_concurrency, ctx_size=s.ctx_size,
                threads=s.model_threads, pooling=s.pooling, default_max_tokens=s.default_max_tokens,
                default_stop=self.template.stop if self.template else _FORMAT_STOPS.get(s.model_format, []),
                normalize=s.embed_normalize,
            )
            _say(f"{s.model_name}: loading {path.name} ({s.worker_concurrency} context(s), ctx {s.ctx_size}) …")
            await self.engine.load()
        except ModelNotFound as e:
            self.store.event("model.failed", str(e), level="error")
            raise StartupError(str(e)) from None
        except (ValueError, RuntimeError, OSError) as e:
            self.store.event("model.failed", str(e), level="error")
            raise StartupError(f"{s.model_name}: could not load the model: {e}") from None
        self.store.event("model.loaded", f"{path.name} loaded in {self.engine.load_seconds:.2f} s",
                         path=str(path), load_seconds=self.engine.load_seconds)
        self.metrics.load_seconds.labels(s.model_name).set(self.engine.load_seconds)
        self.model_info = model_info(self.engine.metadata, n_params=self.engine.n_params, context_size=s.ctx_size)
        formatter = self._formatter()
        if s.model_kind == "inference":
            self.grammars = GrammarStore(s.data_dir / "grammars", self.engine.check_grammar)
        self.runner = Runner(s, self.engine, formatter, self.grammars)
        self.capabilities = capabilities(self.engine.metadata, kind=s.model_kind, grammars=self.grammars is not None)
        self.cancel_sub = await self.nc.subscribe(p.cancel_subject(s.model_kind, s.model_name), cb=self._on_cancel)
        self.psub = await self.js.pull_subscribe_bind(durable=durable, stream=p.STREAM_NAME)
        self.replier = Replier(self.nc, s)
        self.ingress = Ingress(self.nc, self.js, s, self.record)
        await self.ingress.start(self.telemetry.stats_data)
        self.dead_letters = DeadLetters(self.nc, self.js, s, self.store, self.record)
        await self.dead_letters.start()
        await self.nc.flush()

    def _formatter(self) -> Template | Renderer | None:
        s = self.settings
        if s.model_kind != "inference" or s.model_format == "raw":
            return None
        if s.model_format == "template":
            return self.template
        if s.model_format == "chatml":
            return chatml
        if s.model_format == "harmony":
            return Harmony(s.harmony_identity, s.harmony_knowledge_cutoff, s.harmony_reasoning)
        assert self.engine is not None
        md = self.engine.metadata
        template = md.get("tokenizer.chat_template")
        if not template:
            raise StartupError(f"MODEL_FORMAT=chat but {s.model_name}'s GGUF has no tokenizer.chat_template; "
                               "use MODEL_FORMAT=template with a prompt_template.json, or chatml")
        llm = self.engine._contexts[0]
        bos = llm.detokenize([llm.token_bos()], special=True).decode(errors="ignore")
        eos = llm.detokenize([llm.token_eos()], special=True).decode(errors="ignore")
        return gguf_chat(template, bos, eos)

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            req_id = p.CancelRequest.model_validate_json(msg.data).req_id
        except Exception:
            return
        assert self.runner is not None
        state = self.runner.cancel(req_id)
        self.store.event("request.cancel", f"cancel {req_id} ({state})", req_id=req_id, state=state)
        if msg.reply and state == "running":
            await msg.respond(p.json_bytes({"req_id": req_id, "cancelled": True, "worker_id": self.settings.worker_id}))

    async def _start_http(self) -> None:
        addr = self.settings.http_host_port
        if addr is None:
            return
        self.http = server(build_app(self), *addr)
        self._http_task = asyncio.create_task(self.http.serve(), name="http")
        while not self.http.started:
            if self._http_task.done():
                raise StartupError(f"HTTP_ADDR {self.settings.http_addr}: cannot listen there (port in use?); "
                                   "choose another HTTP_ADDR or leave it empty")
            await asyncio.sleep(0.02)

    async def _drain(self, pull: asyncio.Task[None]) -> None:
        s = self.settings
        self.status = "draining"
        if self.telemetry is not None:
            await self.telemetry.heartbeat()
        self.store.event("drain", f"draining {len(self.in_flight)} in-flight request(s)", timeout=s.drain_timeout)
        _say(f"{s.model_name}: draining ({len(self.in_flight)} in flight, up to {s.drain_timeout:g} s)")
        await self.ingress.stop()
        pull.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pull
        if self.in_flight:
            await asyncio.wait(list(self.in_flight), timeout=s.drain_timeout)
        if self.in_flight:
            # Out of time: stop the generations and hand the messages back now (not after ack_wait),
            # so another worker takes them. The threads must finish before the contexts are freed.
            self.aborted = True
            assert self.engine is not None
            self.engine.abort()
            await asyncio.wait(list(self.in_flight), timeout=30)
        self.status = "stopping"
        await self.dead_letters.stop()

    # --- request path ----------------------------------------------------------------

    async def _pull_loop(self) -> None:
        backoff = 0.1
        while True:
            await self.slots.acquire()
            try:
                msgs = await self.psub.fetch(1, timeout=FETCH_WAIT_S)
            except (TimeoutError, nats.errors.TimeoutError):
                self.slots.release()
                continue
            except asyncio.CancelledError:
                self.slots.release()
                raise
            except Exception as e:  # disconnected, JetStream restarting: wait and retry
                self.slots.release()
                self.store.event("queue.fetch_failed", str(e) or type(e).__name__, level="warning")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.1
            msg = msgs[0]
            task = asyncio.create_task(self._handle(msg))
            self.in_flight[task] = msg
            self.metrics.running.labels(self.settings.model_name).set(len(self.in_flight))
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.in_flight.pop(task, None)
        self.metrics.running.labels(self.settings.model_name).set(len(self.in_flight))
        self.slots.release()
        if not task.cancelled() and task.exception() is not None:
            print(f"worker: request task failed: {task.exception()!r}", file=sys.stderr)

    async def _handle(self, msg: Msg) -> None:
        s = self.settings
        h = msg.headers or {}
        start = p.now_ms()
        req_id = h.get(p.H_REQ_ID) or p.new_req_id()
        enqueued = _int(h.get(p.H_ENQUEUED_AT), start)
        deadline = _int(h.get(p.H_DEADLINE), enqueued + s.default_timeout_ms)
        deliveries = msg.metadata.num_delivered or 1
        row: dict[str, Any] = dict(
            req_id=req_id, trace_id=h.get(p.H_TRACE_ID), worker_id=s.worker_id, source="nats",
            raw_input=msg.data.decode(errors="replace"), deliveries=deliveries, queue_ms=float(start - enqueued),
        )
        targets = [h.get(p.H_REPLY_TO)]
        try:
            if start > deadline:
                raise p.BadRequest("expired", f"the caller's deadline passed {start - deadline} ms before a worker "
                                   "was free; the request was skipped", status=504)
            req = p.parse_request(s.model_kind, msg.data)
            targets.append(req.reply_to)
            assert self.runner is not None
            if self.runner.was_cancelled(req_id):
                raise p.BadRequest("cancelled", "the caller cancelled the request before it ran", status=499)
            body = await self._run(req, req_id, msg, row, reply_targets(*targets))
        except p.BadRequest as e:
            status = {"expired": "expired", "cancelled": "cancelled"}.get(e.type, "rejected")
            finish = "cancelled" if status == "cancelled" else "error"
            data, headers = self.replier.error(req_id, e.status, e.type, e.message, finish)
            await self.replier.send(reply_targets(*targets), data, headers, req_id)
            await msg.ack()
            self.record(dict(row, finish_reason=finish, status=status, error=f"{e.status} {e.type}: {e.message}",
                             dur_ms=float(p.now_ms() - start)))
            return
        except Exception as e:
            if self.aborted:
                await msg.nak()
                self.record(dict(row, status="handed_back", error="drain timeout: returned to the queue"))
                return
            # Unexpected: give it back for another try; after max_deliver the dead-letter handler answers.
            self.record(dict(row, finish_reason="error", status="failed", error=repr(e),
                             dur_ms=float(p.now_ms() - start)))
            self.store.event("request.failed", repr(e), level="error", req_id=req_id, deliveries=deliveries)
            await msg.nak(delay=1.0)
            return
        if self.aborted:
            await msg.nak()
            self.record(dict(row, status="handed_back", error="drain timeout: returned to the queue"))
            return
        await self.replier.send(reply_targets(*targets), p.dumps(body), None, req_id)
        await msg.ack()
        self.record(dict(row, status="cancelled" if row.get("finish_reason") == "cancelled" else "ok"))

    async def _run(self, req: p.InferenceRequest | p.EmbeddingRequest, req_id: str, msg: Msg,
                   row: dict[str, Any], targets: list[str]) -> p.InferenceResponse | p.EmbeddingResponse:
        """Run on the engine, keeping the JetStream message alive; stream pieces if the caller asked."""
        assert self.runner is not None
        keepalive = asyncio.create_task(self._keep_alive(msg))
        pump: DeltaPump | None = None
        if isinstance(req, p.InferenceRequest) and req.stream:
            async def publish(index: int, delta: str) -> None:
                await self.replier.send(targets, p.dumps(p.StreamChunk(req_id=req_id, index=index, delta=delta)))

            pump = DeltaPump(publish)
        try:
            body = await self.runner.execute(req, req_id, row, on_delta=pump.push if pump else None)
        finally:
            keepalive.cancel()
            if pump is not None:
                await pump.close()
        if pump is not None and isinstance(body, p.InferenceResponse):
            body.done = True
        return body

    async def _keep_alive(self, msg: Msg) -> None:
        """Tell JetStream the message is still being worked on, well within ack_wait."""
        interval = max(0.5, self.settings.queue_ack_wait_s / 3)
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                await msg.in_progress()


_FORMAT_STOPS = {"chatml": CHATML_STOP, "harmony": HARMONY_STOP}


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value else default
    except ValueError:
        return default


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
