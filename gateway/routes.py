"""The OpenAI routes: `/v1/chat/completions`, `/v1/completions` and `/v1/embeddings` for every model in the fleet.

Each body is read with the worker's own OpenAI shapes (workers/openai_api.py), turned into the fleet's request
(workers/protocol.py) and sent over NATS (fleet.py); the reply goes back in OpenAI's shape, `model` naming the model
that answered and the `Fleet-Req-Id` header the request's id (as in the worker's log). `"stream": true` answers with
server-sent events made from the NATS token stream. An HTTP client that goes away, streaming or not, cancels its
request on the worker. Errors are OpenAI's error body with the fleet's status codes (see fleet.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from workers import protocol as p
from workers.httpkit import PARAM_OF, Handler, error, error_fields, json_object, read_body, refusal
from workers.openai_api import OPENAI_PARAMS, Chat, Completion, Embeddings, b64

from . import orchestrate
from .admin import change
from .cache import ResponseCache
from .clients import Clients
from .config import GatewaySettings
from .fleet import Call, Fleet, Stream
from .metrics import GatewayMetrics
from .routing import Router
from .tracing import HttpSpan

log = logging.getLogger(__name__)
T = TypeVar("T")
PARAMS = {**PARAM_OF, "model_not_found": "model", "wrong_model_kind": "model", "no_worker": "model",
          "invalid_model": "model", "circuit_open": "model", "invalid_task_type": "task_type",
          "invalid_routing": "routing"}
NOT_THE_MODEL = {"client_closed", "nats_unavailable"}  # failures the model's breaker does not count
FALL_THROUGH = {429, 503}  # the next candidate model is tried (no live worker, queue full, breaker open)
RETRY = {429, 503}  # answered with Retry-After
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

Chunk = Callable[[str | None, str | None], dict[str, Any]]  # (text, finish_reason) -> one event


def usage(out: p.InferenceResponse) -> dict[str, Any]:
    counts: dict[str, Any] = {"prompt_tokens": out.tokens_in, "completion_tokens": out.tokens_out,
                              "total_tokens": out.tokens_in + out.tokens_out}
    if out.cached_tokens is not None:
        counts["prompt_tokens_details"] = {"cached_tokens": out.cached_tokens}
    return counts


@dataclass
class Parts:
    """What the routes use: the fleet connection and the gateway's policies."""

    fleet: Fleet
    settings: GatewaySettings
    router: Router
    cache: ResponseCache
    clients: Clients
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)


@dataclass
class Plan:
    """One HTTP request's fleet requests: the candidate models in order, one req_id, deadline and trace headers."""

    kind: p.Kind
    models: list[str]
    timeout_s: float
    headers: dict[str, str]
    req_id: str = field(default_factory=p.new_req_id)

    def call(self, model: str) -> Call:
        return Call(self.kind, model, self.timeout_s, self.headers, self.req_id)


def routes(parts: Parts) -> list[Route]:
    fleet, settings, router, cache, clients, metrics = (parts.fleet, parts.settings, parts.router, parts.cache,
                                                         parts.clients, parts.metrics)

    def answering(fn: Handler) -> Handler:
        async def wrapped(request: Request) -> Response:
            started = time.monotonic()
            request.state.client, request.state.model = None, None
            request.state.trace = trace = HttpSpan(request.method, request.url.path, request.headers)
            try:
                request.state.client = clients.admit(request)
                resp = await fn(request)
            except (p.BadRequest, ValidationError) as e:
                resp = refusal(e, PARAMS)
                if resp.status_code in RETRY:
                    resp.headers["Retry-After"] = str(max(1, round(getattr(e, "retry_after", 1))))
            except Exception as e:  # a bug of ours: one logged traceback, the contract's 500
                log.exception("%s %s failed", request.method, request.url.path)
                resp = error(500, "internal_error", f"internal error ({type(e).__name__}); see the gateway's log")
            metrics.request(request.url.path, request.state.model or "", request.state.client, resp.status_code,
                            time.monotonic() - started)
            trace.end(request, resp.status_code, time.monotonic() - started)
            return resp
        return wrapped

    def meter(request: Request, model: str, tokens_in: int, tokens_out: int) -> None:
        """Count a request's tokens against its client (rate limits) and in the metrics."""
        request.state.model = model
        clients.used(request.state.client, tokens_in + tokens_out)
        metrics.tokens(request.state.client, model, tokens_in, tokens_out)

    async def first(request: Request, plan: Plan, send: Callable[[Call], Awaitable[T]]) -> tuple[Call, T]:
        """The answer of the first candidate model that takes the request: the next one is tried when a model has
        no live worker, a full queue or an open breaker; the breaker hears how each attempt went."""
        last: p.BadRequest | None = None
        for model in plan.models:
            if not router.allow(model):
                last = last or p.BadRequest("circuit_open", f"{model} failed {settings.gateway_breaker_failures} "
                                            f"times in a row; it gets requests again after "
                                            f"{settings.gateway_breaker_cooldown_s:g} s", status=503)
                continue
            call = plan.call(model)
            try:
                result = await unless_gone(request, call, send(call))
            except p.BadRequest as e:
                if e.status >= 500 and e.type not in NOT_THE_MODEL:
                    router.record(model, ok=False)
                if e.status in FALL_THROUGH:
                    last = e
                    continue
                raise
            router.record(model, ok=True)
            request.state.model = model
            return call, result
        assert last is not None
        raise last

    async def body_of(request: Request) -> dict[str, Any]:
        return json_object(await read_body(request, settings.gateway_max_request_bytes))

    def plan_for(request: Request, kind: p.Kind, body: dict[str, Any]) -> Plan:
        models = router.candidates(kind, body)
        trace = {k: v for k in (p.H_TRACEPARENT, p.H_TRACE_ID) if (v := request.headers.get(k)) is not None}
        p.trace_id(trace)  # a malformed one is a 400 here rather than at the worker
        req_id = p.new_req_id()
        # the client's trace headers, with the gateway's span as the parent of the workers' (tracing.py)
        headers = request.state.trace.forward(trace, req_id, body.get("model"))
        headers[p.H_PRIORITY] = str(p.priority_of(request.headers, body.get("priority")))
        return Plan(kind, models, timeout_of(request), headers, req_id)

    def timeout_of(request: Request) -> float:
        given = request.headers.get(p.H_TIMEOUT_MS)
        if given is None:
            return settings.gateway_timeout_s
        if not given.isdigit() or int(given) < 1 or len(given) > 12:
            raise p.BadRequest("invalid_header", f"{p.H_TIMEOUT_MS} is a whole number of milliseconds above 0")
        return min(int(given) / 1000, settings.gateway_max_timeout_s)

    async def unless_gone(request: Request, call: Call | list[Call], aw: Awaitable[T]) -> T:
        """`aw`, unless the HTTP client disconnects first: then the request (or every request in the list, as it
        stands then) is cancelled on its worker."""
        task = asyncio.ensure_future(aw)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()
                for c in call if isinstance(call, list) else [call]:
                    fleet.cancel(c)
        if not task.done() or task.cancelled():
            raise p.BadRequest("client_closed", "the client closed the connection; the request was cancelled",
                               status=499)
        return task.result()

    def inference_request(body: dict[str, Any], plan: Plan, stream: bool | None, **extra: Any) -> p.InferenceRequest:
        req = p.InferenceRequest.model_validate({"req_id": plan.req_id, "params": params_of(body),
                                                 "stream": bool(stream), **extra})
        req.check()
        return req

    async def answer(request: Request, plan: Plan, req: p.InferenceRequest) -> tuple[Call, p.InferenceResponse]:
        call, reply = await first(request, plan, lambda c: fleet.ask(c, req))
        out = _inference(reply)
        meter(request, out.model, out.tokens_in, out.tokens_out)
        return call, out

    async def cached(request: Request, route: str, body: dict[str, Any],
                     respond: Callable[[], Awaitable[tuple[Call, dict[str, Any]]]]) -> Response:
        """A non-streamed answer, from the response cache when the request is deterministic and was answered
        before (`x-fleet-cache: hit`), else from the fleet (and then kept: `miss`)."""
        key = cache.key(route, body)
        if key is not None and (hit := await cache.get(key)) is not None:
            metrics.cache(hit=True)
            request.state.model = hit.get("model")
            return JSONResponse(hit, headers={"x-fleet-cache": "hit"})
        call, out = await respond()
        headers = {p.H_REQ_ID: call.req_id}
        if key is not None:
            metrics.cache(hit=False)
            await cache.put(key, out)
            headers["x-fleet-cache"] = "miss"
        return JSONResponse(out, headers=headers)

    async def orchestrated(request: Request, plan: Plan, body: dict[str, Any], mode: str,
                           messages: list[dict[str, str]]) -> Response:
        """Several fleet requests for one answer (orchestrate.py): each step is its own logged request; the HTTP
        client going away cancels the steps still running."""
        running: list[Call] = []

        async def step(name: str, model: str, step_messages: list[dict[str, str]],
                       step_params: dict[str, Any]) -> orchestrate.StepResult:
            call = Call("inference", model, plan.timeout_s, plan.headers)
            req = p.InferenceRequest(req_id=call.req_id, messages=step_messages,
                                     params=p.Params.model_validate(step_params))
            req.check()
            started = time.monotonic()
            running.append(call)
            try:
                out = _inference(await fleet.ask(call, req))
            except asyncio.CancelledError:  # a sibling step failed, or the client went: stop it on its worker
                fleet.cancel(call)
                raise
            finally:
                running.remove(call)
            meter(request, out.model, out.tokens_in, out.tokens_out)
            return orchestrate.StepResult(name, out.model, call.req_id, out.text,
                                          (time.monotonic() - started) * 1000, out.tokens_in, out.tokens_out)

        given = body.get("models")
        models = ([m for g in given for m in router.candidates("inference", {"model": g})]
                  if isinstance(given, list) and given else plan.models)
        params = params_of(body).model_dump(exclude_none=True)
        rounds = body.get("rounds", 1)
        if not isinstance(rounds, int) or isinstance(rounds, bool):
            raise p.BadRequest("invalid_request", "rounds is a whole number (1-3, critique only)")
        done = await unless_gone(request, running, orchestrate.run(mode, messages, params, models, step, rounds))
        request.state.model = done.final.model
        return JSONResponse({"id": f"chatcmpl-{plan.req_id}", "object": "chat.completion",
                             "created": int(time.time()), "model": done.final.model,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": sum(s.tokens_in for s in done.steps),
                                       "completion_tokens": sum(s.tokens_out for s in done.steps),
                                       "total_tokens": sum(s.tokens_in + s.tokens_out for s in done.steps)},
                             "orchestration": done.block(mode)}, headers={p.H_REQ_ID: plan.req_id})

    def streamed(request: Request, call: Call, stream: Stream, chunk: Chunk,
                 final: Callable[[p.InferenceResponse], list[dict[str, Any]]]) -> StreamingResponse:
        """Server-sent events: the opening event, one per NATS chunk, the final event(s), `[DONE]`. A failure
        after the headers went out is a last event `{"error": …}` before `[DONE]`; a client that goes away
        cancels the request on its worker."""

        async def events() -> AsyncIterator[str]:
            try:
                if opening := chunk(None, None):
                    yield _event(opening)
                data = stream.first
                try:
                    while "delta" in data and not data.get("done"):
                        if data["delta"]:
                            yield _event(chunk(str(data["delta"]), None))
                        data = await stream.next()
                    last = final(_inference(data))
                except p.BadRequest as e:
                    last = [{"error": error_fields(e.status, e.type, e.message, PARAMS.get(e.type))}]
                for event in last:
                    yield _event(event)
                yield "data: [DONE]\n\n"
            finally:
                if not stream.finished:
                    fleet.cancel(call)
                fleet.detach(stream.close())

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**SSE_HEADERS, p.H_REQ_ID: call.req_id})

    @answering
    async def chat_completions(request: Request) -> Response:
        body = await body_of(request)
        plan = plan_for(request, "inference", body)
        shape = Chat.model_validate(body)
        messages = [{"role": m.role, "content": m.text} for m in shape.messages]
        mode = body.get("orchestration_mode")
        if mode is not None and mode != "single":
            if shape.stream:
                raise p.BadRequest("invalid_request", "orchestration_mode cannot stream: send \"stream\": false")
            return await orchestrated(request, plan, body, str(mode), messages)
        req = inference_request(body, plan, shape.stream, messages=messages)
        cid, created = f"chatcmpl-{plan.req_id}", int(time.time())

        def chunk_of(model: str) -> Chunk:
            def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
                delta = {"role": "assistant", "content": ""} if text is None and finish is None else (
                    {"content": text} if text else {})
                return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return chunk

        if req.stream:
            call, stream = await first(request, plan, lambda c: fleet.open(c, req))
            chunk = chunk_of(str(stream.first.get("model") or call.model))

            def final(out: p.InferenceResponse) -> list[dict[str, Any]]:
                meter(request, out.model, out.tokens_in, out.tokens_out)
                events = [chunk(None, out.finish_reason) | {
                    "choices": [{"index": 0, "delta": {}, "finish_reason": out.finish_reason}]}]
                if _include_usage(body):
                    events.append(chunk(None, None) | {"choices": [], "usage": usage(out)})
                return events

            return streamed(request, call, stream, chunk, final)
        async def respond() -> tuple[Call, dict[str, Any]]:
            call, out = await answer(request, plan, req)
            message: dict[str, Any] = {"role": "assistant", "content": out.text}
            if out.reasoning is not None:
                message["reasoning_content"] = out.reasoning
            return call, {"id": cid, "object": "chat.completion", "created": created, "model": out.model,
                          "choices": [{"index": 0, "message": message, "finish_reason": out.finish_reason}],
                          "usage": usage(out)}

        return await cached(request, "chat", body, respond)

    @answering
    async def completions(request: Request) -> Response:
        body = await body_of(request)
        plan = plan_for(request, "inference", body)
        shape = Completion.model_validate(body)
        req = inference_request(body, plan, shape.stream, input=shape.prompt, raw=True)
        cid, created = f"cmpl-{plan.req_id}", int(time.time())

        def chunk_of(model: str) -> Chunk:
            def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
                if text is None and finish is None:
                    return {}
                return {"id": cid, "object": "text_completion", "created": created, "model": model,
                        "choices": [{"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}]}
            return chunk

        if req.stream:
            call, stream = await first(request, plan, lambda c: fleet.open(c, req))
            chunk = chunk_of(str(stream.first.get("model") or call.model))

            def final(out: p.InferenceResponse) -> list[dict[str, Any]]:
                meter(request, out.model, out.tokens_in, out.tokens_out)
                events = [chunk("", out.finish_reason)]
                if _include_usage(body):
                    events.append(chunk("", None) | {"choices": [], "usage": usage(out)})
                return events

            return streamed(request, call, stream, chunk, final)
        async def respond() -> tuple[Call, dict[str, Any]]:
            call, out = await answer(request, plan, req)
            return call, {**chunk_of(out.model)(out.text, out.finish_reason), "usage": usage(out)}

        return await cached(request, "completions", body, respond)

    @answering
    async def embeddings(request: Request) -> Response:
        body = await body_of(request)
        plan = plan_for(request, "embedding", body)
        shape = Embeddings.model_validate(body)

        def embedding_request(call: Call) -> p.EmbeddingRequest:
            req = p.EmbeddingRequest(req_id=call.req_id, input=shape.input, model=call.model)
            req.check()
            return req

        async def respond() -> tuple[Call, dict[str, Any]]:
            call, reply = await first(request, plan, lambda c: fleet.ask(c, embedding_request(c)))
            out = _parsed(p.EmbeddingResponse, reply)
            meter(request, out.model, out.usage.prompt_tokens, 0)
            data = [{"object": "embedding", "index": d.index,
                     "embedding": b64(d.embedding) if shape.encoding_format == "base64" else d.embedding}
                    for d in out.data]
            return call, {"object": "list", "data": data, "model": out.model, "usage": out.usage.model_dump()}

        return await cached(request, "embeddings", body, respond)

    @answering
    async def load(request: Request) -> Response:
        return await change(request, "load", clients=clients, settings=settings, fleet=fleet)

    @answering
    async def unload(request: Request) -> Response:
        return await change(request, "unload", clients=clients, settings=settings, fleet=fleet)

    return [
        Route("/v1/models/{model}/load", load, methods=["POST"]),
        Route("/v1/models/{model}/unload", unload, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
    ]


def params_of(body: dict[str, Any]) -> p.Params:
    """The fleet's sampling parameters from an OpenAI body."""
    given = {k: body[k] for k in OPENAI_PARAMS if body.get(k) is not None}
    if "max_tokens" not in given and body.get("max_completion_tokens") is not None:  # OpenAI's newer name
        given["max_tokens"] = body["max_completion_tokens"]
    return p.Params.model_validate(given)


async def _disconnected(request: Request) -> None:
    """Returns when the HTTP client has gone (the body was read already, so nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


M = TypeVar("M", p.InferenceResponse, p.EmbeddingResponse)


def _parsed(shape: type[M], reply: dict[str, Any]) -> M:
    try:
        return shape.model_validate(reply)
    except ValidationError as e:
        raise p.BadRequest("bad_gateway", f"the worker's answer does not fit the contract "
                           f"({p.validation_message(e)}); see its log (make logs)", status=502) from None


def _inference(reply: dict[str, Any]) -> p.InferenceResponse:
    return _parsed(p.InferenceResponse, reply)
