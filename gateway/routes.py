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
from typing import Any, TypeVar

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from workers import discovery
from workers import protocol as p
from workers.httpkit import PARAM_OF, Handler, error, error_fields, json_object, read_body, refusal
from workers.openai_api import OPENAI_PARAMS, Chat, Completion, Embeddings, b64

from .config import GatewaySettings
from .fleet import Call, Fleet, Stream

log = logging.getLogger(__name__)
T = TypeVar("T")
PARAMS = {**PARAM_OF, "model_not_found": "model", "wrong_model_kind": "model", "no_worker": "model",
          "invalid_model": "model"}
RETRY = {429, 503}  # answered with Retry-After
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

Chunk = Callable[[str | None, str | None], dict[str, Any]]  # (text, finish_reason) -> one event


def usage(out: p.InferenceResponse) -> dict[str, Any]:
    counts: dict[str, Any] = {"prompt_tokens": out.tokens_in, "completion_tokens": out.tokens_out,
                              "total_tokens": out.tokens_in + out.tokens_out}
    if out.cached_tokens is not None:
        counts["prompt_tokens_details"] = {"cached_tokens": out.cached_tokens}
    return counts


def routes(fleet: Fleet, settings: GatewaySettings) -> list[Route]:
    def answering(fn: Handler) -> Handler:
        async def wrapped(request: Request) -> Response:
            try:
                return await fn(request)
            except (p.BadRequest, ValidationError) as e:
                resp = refusal(e, PARAMS)
                if resp.status_code in RETRY:
                    resp.headers["Retry-After"] = "1"
                return resp
            except Exception as e:  # a bug of ours: one logged traceback, the contract's 500
                log.exception("%s %s failed", request.method, request.url.path)
                return error(500, "internal_error", f"internal error ({type(e).__name__}); see the gateway's log")
        return wrapped

    async def body_of(request: Request) -> dict[str, Any]:
        return json_object(await read_body(request, settings.gateway_max_request_bytes))

    def call_for(request: Request, kind: p.Kind, body: dict[str, Any]) -> Call:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise p.BadRequest("invalid_model", "model is required: a model's name, as GET /v1/models lists them")
        if not discovery.MODEL_NAME.match(model) or len(model) > 200:
            raise p.BadRequest("invalid_model", f"model {model[:80]!r} is not a model name (letters, digits, '.', "
                               "'_', '-'); GET /v1/models lists them")
        fleet.check_kind(kind, model)
        trace = {k: v for k in (p.H_TRACEPARENT, p.H_TRACE_ID) if (v := request.headers.get(k)) is not None}
        p.trace_id(trace)  # a malformed one is a 400 here rather than at the worker
        return Call(kind, model, timeout_of(request), trace)

    def timeout_of(request: Request) -> float:
        given = request.headers.get(p.H_TIMEOUT_MS)
        if given is None:
            return settings.gateway_timeout_s
        if not given.isdigit() or int(given) < 1 or len(given) > 12:
            raise p.BadRequest("invalid_header", f"{p.H_TIMEOUT_MS} is a whole number of milliseconds above 0")
        return min(int(given) / 1000, settings.gateway_max_timeout_s)

    async def unless_gone(request: Request, call: Call, aw: Awaitable[T]) -> T:
        """`aw`, unless the HTTP client disconnects first: then the request is cancelled on its worker."""
        task = asyncio.ensure_future(aw)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()
                fleet.cancel(call)
        if not task.done() or task.cancelled():
            raise p.BadRequest("client_closed", "the client closed the connection; the request was cancelled",
                               status=499)
        return task.result()

    def inference_request(body: dict[str, Any], call: Call, stream: bool | None, **extra: Any) -> p.InferenceRequest:
        given = {k: body[k] for k in OPENAI_PARAMS if body.get(k) is not None}
        if "max_tokens" not in given and body.get("max_completion_tokens") is not None:  # OpenAI's newer name
            given["max_tokens"] = body["max_completion_tokens"]
        req = p.InferenceRequest.model_validate({"req_id": call.req_id, "params": p.Params.model_validate(given),
                                                 "stream": bool(stream), **extra})
        req.check()
        return req

    async def answer(request: Request, call: Call, req: p.InferenceRequest) -> p.InferenceResponse:
        return _inference(await unless_gone(request, call, fleet.ask(call, req)))

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
        call = call_for(request, "inference", body)
        shape = Chat.model_validate(body)
        req = inference_request(body, call, shape.stream, messages=[{"role": m.role, "content": m.text}
                                                                     for m in shape.messages])
        cid, created = f"chatcmpl-{call.req_id}", int(time.time())

        def chunk_of(model: str) -> Chunk:
            def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
                delta = {"role": "assistant", "content": ""} if text is None and finish is None else (
                    {"content": text} if text else {})
                return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return chunk

        if req.stream:
            stream = await unless_gone(request, call, fleet.open(call, req))
            chunk = chunk_of(str(stream.first.get("model") or call.model))

            def final(out: p.InferenceResponse) -> list[dict[str, Any]]:
                events = [chunk(None, out.finish_reason) | {
                    "choices": [{"index": 0, "delta": {}, "finish_reason": out.finish_reason}]}]
                if _include_usage(body):
                    events.append(chunk(None, None) | {"choices": [], "usage": usage(out)})
                return events

            return streamed(request, call, stream, chunk, final)
        out = await answer(request, call, req)
        message: dict[str, Any] = {"role": "assistant", "content": out.text}
        if out.reasoning is not None:
            message["reasoning_content"] = out.reasoning
        return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": out.model,
                             "choices": [{"index": 0, "message": message, "finish_reason": out.finish_reason}],
                             "usage": usage(out)}, headers={p.H_REQ_ID: call.req_id})

    @answering
    async def completions(request: Request) -> Response:
        body = await body_of(request)
        call = call_for(request, "inference", body)
        shape = Completion.model_validate(body)
        req = inference_request(body, call, shape.stream, input=shape.prompt, raw=True)
        cid, created = f"cmpl-{call.req_id}", int(time.time())

        def chunk_of(model: str) -> Chunk:
            def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
                if text is None and finish is None:
                    return {}
                return {"id": cid, "object": "text_completion", "created": created, "model": model,
                        "choices": [{"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}]}
            return chunk

        if req.stream:
            stream = await unless_gone(request, call, fleet.open(call, req))
            chunk = chunk_of(str(stream.first.get("model") or call.model))

            def final(out: p.InferenceResponse) -> list[dict[str, Any]]:
                events = [chunk("", out.finish_reason)]
                if _include_usage(body):
                    events.append(chunk("", None) | {"choices": [], "usage": usage(out)})
                return events

            return streamed(request, call, stream, chunk, final)
        out = await answer(request, call, req)
        return JSONResponse({**chunk_of(out.model)(out.text, out.finish_reason), "usage": usage(out)},
                            headers={p.H_REQ_ID: call.req_id})

    @answering
    async def embeddings(request: Request) -> Response:
        body = await body_of(request)
        call = call_for(request, "embedding", body)
        shape = Embeddings.model_validate(body)
        req = p.EmbeddingRequest(req_id=call.req_id, input=shape.input, model=call.model)
        req.check()
        out = _parsed(p.EmbeddingResponse, await unless_gone(request, call, fleet.ask(call, req)))
        data = [{"object": "embedding", "index": d.index,
                 "embedding": b64(d.embedding) if shape.encoding_format == "base64" else d.embedding}
                for d in out.data]
        return JSONResponse({"object": "list", "data": data, "model": out.model, "usage": out.usage.model_dump()},
                            headers={p.H_REQ_ID: call.req_id})

    return [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
    ]


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
