"""OpenAI-compatible routes (and the seed's own body) on the worker's HTTP address.

HTTP requests use the same engine slots as NATS requests, are logged with source=http and
counted in the metrics. Admission is bounded: more than WORKER_CONCURRENCY + HTTP_QUEUE_LIMIT
requests at once get a 429 at once instead of piling up. A body is read piece by piece up to
MAX_REQUEST_BYTES, parsed with the contract's `loads` and validated against the OpenAI shapes, so bad
input is an OpenAI-shaped 4xx naming the field, and a failure nobody expected is the contract's 500.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import protocol as p
from .httpkit import PARAM_OF, Handler, error, error_fields, internal_error, json_object, read_body, refusal
from .outcome import Finished, Intake
from .runner import DeltaPump, Execution
from .surface import Serving

OPENAI_PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "repeat_penalty", "min_p", "frequency_penalty",
                 "presence_penalty", "logit_bias", "stop", "seed", "grammar")
# --- the OpenAI request shapes (the fields this worker reads; others are ignored) -------------------------------


class _Shape(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Shape):
    type: Literal["text"]
    text: str


class Message(_Shape):
    role: str
    content: list[TextPart]  # a string arrives as one text part

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [{"type": "text", "text": v}]
        if not isinstance(v, list):
            raise ValueError("content must be a string or a list of text parts")
        return v

    @property
    def text(self) -> str:
        return "".join(part.text for part in self.content)


class Chat(_Shape):
    messages: list[Message] = Field(min_length=1)
    stream: bool | None = None


class Completion(_Shape):
    prompt: str
    stream: bool | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one(cls, v: Any) -> Any:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("send one prompt per request: a string or a list of one string")
            return v[0]
        return v


class Embeddings(_Shape):
    input: list[str]  # a string arrives as a list of one
    model: str | None = None
    encoding_format: Literal["float", "base64"] | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _texts(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [v]
        if not isinstance(v, list):
            raise ValueError("input must be a string or a list of strings")
        return v


Chunk = Callable[[str | None, str | None], dict[str, Any]]


def routes(worker: Serving) -> list[Route]:
    s = worker.settings
    spec = p.KINDS[s.model_kind]
    gate = worker.gate

    def refuse() -> JSONResponse | None:
        if worker.status != "online" or worker.runner is None:
            return error(503, "unavailable", f"the worker is {worker.status}; retry in a moment")
        if gate.full:
            return error(429, "rate_limited", f"{gate.active} HTTP requests are already running or waiting "
                         f"(limit {gate.capacity}); retry later")
        return None

    async def body_of(request: Request) -> dict[str, Any]:
        return json_object(await read_body(request, s.max_request_bytes))

    async def run(req: p.InferenceRequest | p.EmbeddingRequest, raw: dict[str, Any], trace: str | None,
                  on_delta: Callable[[str], None] | None = None) -> Any:
        """Run on the shared runner, log it with source=http, count it; the response body."""
        runner = worker.runner
        if runner is None:
            raise p.BadRequest("unavailable", f"the worker is {worker.status}; retry in a moment", status=503)
        req_id = req.req_id or p.new_req_id()
        intake = Intake(req_id=req_id, worker_id=s.worker_id, source="http", raw_input=json.dumps(raw),
                        trace_id=trace)
        gate.active += 1
        t0 = time.perf_counter()
        try:
            done: Execution = await runner.execute(req, req_id, on_delta=on_delta)
        except p.BadRequest as e:
            worker.ledger.record(Finished.refused(intake, e))
            e.recorded = True
            raise
        except Exception as e:
            worker.ledger.record(Finished.failed(intake, e, (time.perf_counter() - t0) * 1000))
            raise
        finally:
            gate.active -= 1
        worker.ledger.record(Finished.ok(intake, done.facts))
        return done.body

    def handler(fn: Handler) -> Handler:
        async def checked(request: Request) -> Response:
            try:
                return await fn(request)
            except (p.BadRequest, ValidationError) as e:
                if not getattr(e, "recorded", False):  # refused before it ran: logged here, once
                    trace = None
                    with contextlib.suppress(p.BadRequest):
                        trace = p.trace_id(request.headers)
                    intake = Intake(req_id=p.new_req_id(), worker_id=s.worker_id, source="http", trace_id=trace,
                                    raw_input=f"{request.method} {request.url.path}")
                    bad = e if isinstance(e, p.BadRequest) else p.BadRequest("invalid_request",
                                                                            p.validation_message(e))
                    worker.ledger.record(Finished.refused(intake, bad))
                return refusal(e)

        async def wrapped(request: Request) -> Response:
            return refused if (refused := refuse()) is not None else await checked(request)
        return wrapped

    def wrong_kind(route: str) -> p.BadRequest:
        return p.BadRequest("wrong_model_kind", f"{s.model_name} is a {s.model_kind} model and does not serve "
                            f"{route}; use {spec.http_route}", status=404)

    def generating() -> None:
        if not spec.generates:
            raise wrong_kind("text generation")

    def inference_request(body: dict[str, Any], stream: bool | None, **extra: Any) -> p.InferenceRequest:
        params = p.Params.model_validate({k: body[k] for k in OPENAI_PARAMS if body.get(k) is not None})
        req = p.InferenceRequest.model_validate({"params": params, "stream": bool(stream), **extra})
        req.check(s.limits)
        return req

    def streamed(request: Request, req: p.InferenceRequest, raw: dict[str, Any], chunk: Chunk,
                 final: Callable[[p.InferenceResponse], list[dict[str, Any]]]) -> StreamingResponse:
        """Server-sent events: one event per piece, then the final event(s), then `[DONE]`. The pieces come
        from the generation thread through the runner's DeltaPump, as they do for NATS streams. A failure after
        the headers went out is a last event `{"error": …}` before `[DONE]`."""
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        req_id = req.req_id = req.req_id or p.new_req_id()

        async def put(_index: int, delta: str) -> None:
            queue.put_nowait(delta)

        async def produce() -> p.InferenceResponse:
            pump = DeltaPump(put)
            try:
                out: p.InferenceResponse = await run(req, raw, p.trace_id(request.headers), on_delta=pump.push)
                return out
            finally:
                await pump.close()
                queue.put_nowait(None)

        def event(data: dict[str, Any]) -> str:
            return f"data: {json.dumps(data)}\n\n"

        async def events() -> AsyncIterator[str]:
            task = asyncio.create_task(produce())
            try:
                try:
                    if first := chunk(None, None):
                        yield event(first)
                    while (piece := await queue.get()) is not None:
                        yield event(chunk(piece, None))
                    last = final(await task)
                except p.BadRequest as e:
                    last = [{"error": error_fields(e.status, e.type, e.message, PARAM_OF.get(e.type))}]
                except Exception as e:
                    last = [{"error": internal_error(worker, e, f"{request.method} {request.url.path} (stream)")}]
                for data in last:
                    yield event(data)
                yield "data: [DONE]\n\n"
            finally:
                if not task.done():  # the client went away: stop generating for nobody
                    if worker.runner is not None:
                        worker.runner.cancel(req_id)
                    await asyncio.gather(task, return_exceptions=True)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def usage(out: p.InferenceResponse) -> dict[str, Any]:
        counts: dict[str, Any] = {"prompt_tokens": out.tokens_in, "completion_tokens": out.tokens_out,
                                  "total_tokens": out.tokens_in + out.tokens_out}
        if out.cached_tokens is not None:  # as OpenAI reports prompt caching
            counts["prompt_tokens_details"] = {"cached_tokens": out.cached_tokens}
        return counts

    @handler
    async def completions(request: Request) -> Response:
        body = await body_of(request)
        generating()
        if "input" in body or "params" in body:  # the seed's body, answered in its own shape
            req = p.InferenceRequest.model_validate(body)
            req.check(s.limits)
            if req.stream:
                return streamed(request, req, body, lambda d, _f: {"req_id": req.req_id, "delta": d} if d else {},
                                lambda out: [json.loads(p.dumps(out.model_copy(update={"done": True})))])
            out = await run(req, body, p.trace_id(request.headers))
            return Response(p.dumps(out), media_type="application/json")
        shape = Completion.model_validate(body)
        req = inference_request(body, shape.stream, input=shape.prompt, raw=True)
        cid, created = f"cmpl-{p.new_req_id()}", int(time.time())

        def text_chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            if text is None and finish is None:
                return {}
            return {"id": cid, "object": "text_completion", "created": created, "model": s.model_name,
                    "choices": [{"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            return streamed(request, req, body, text_chunk, lambda out: [text_chunk("", out.finish_reason)])
        out = await run(req, body, p.trace_id(request.headers))
        return JSONResponse({**text_chunk(out.text, out.finish_reason), "usage": usage(out)})

    @handler
    async def chat_completions(request: Request) -> Response:
        body = await body_of(request)
        generating()
        shape = Chat.model_validate(body)
        messages = [{"role": m.role, "content": m.text} for m in shape.messages]
        req = inference_request(body, shape.stream, messages=messages)
        cid, created = f"chatcmpl-{p.new_req_id()}", int(time.time())

        def chat_chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            delta = {"role": "assistant", "content": ""} if text is None and finish is None else (
                {"content": text} if text else {})
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": s.model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        if req.stream:
            return streamed(request, req, body, chat_chunk, lambda out: [chat_chunk(None, out.finish_reason) | {
                "choices": [{"index": 0, "delta": {}, "finish_reason": out.finish_reason}]}])
        out = await run(req, body, p.trace_id(request.headers))
        message: dict[str, Any] = {"role": "assistant", "content": out.text}
        if out.reasoning is not None:
            message["reasoning_content"] = out.reasoning
        return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": s.model_name,
                             "choices": [{"index": 0, "message": message, "finish_reason": out.finish_reason}],
                             "usage": usage(out)})

    @handler
    async def embeddings(request: Request) -> Response:
        body = await body_of(request)
        if spec.response is not p.EmbeddingResponse:
            raise wrong_kind("/v1/embeddings")
        shape = Embeddings.model_validate(body)
        req = p.EmbeddingRequest(input=shape.input, model=shape.model)
        req.check(s.limits)
        out = await run(req, body, p.trace_id(request.headers))
        data = [{"object": "embedding", "index": d.index,
                 "embedding": b64(d.embedding) if shape.encoding_format == "base64" else d.embedding}
                for d in out.data]
        return JSONResponse({"object": "list", "data": data, "model": out.model, "usage": out.usage.model_dump()})

    async def models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{
            "id": s.model_name, "object": "model", "created": int(worker.started_at), "owned_by": "nats-llm-fleet",
            "kind": s.model_kind, "capabilities": worker.card.capabilities, "model_info": worker.card.model_info}]})

    return [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
    ]


def b64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
