"""OpenAI-compatible routes (and the seed's own body) on the worker's HTTP address.

HTTP requests use the same engine slots as NATS requests, are logged with source=http and
counted in the metrics. Admission is bounded: more than WORKER_CONCURRENCY + HTTP_QUEUE_LIMIT
requests at once get a 429 at once instead of piling up.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import protocol as p
from .outcome import Finished, Intake
from .runner import DeltaPump, Execution
from .surface import Serving

OPENAI_PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "repeat_penalty", "stop", "seed", "grammar")


def error(status: int, type_: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": status}},
                        status_code=status)


Chunk = Callable[[str | None, str | None], dict[str, Any]]
Handler = Callable[[Request], Awaitable[Response]]


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
        raw = await request.body()
        if len(raw) > s.max_request_bytes:
            raise p.BadRequest("payload_too_large", f"request is {len(raw)} bytes; the limit is "
                               f"{s.max_request_bytes}", status=413)
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise p.BadRequest("invalid_json", f"body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise p.BadRequest("invalid_request", "body must be a JSON object")
        return body

    async def run(req: p.InferenceRequest | p.EmbeddingRequest, raw: dict[str, Any],
                  on_delta: Callable[[str], None] | None = None) -> Any:
        """Run on the shared runner, log it with source=http, count it; the response body."""
        runner = worker.runner
        if runner is None:
            raise p.BadRequest("unavailable", f"the worker is {worker.status}; retry in a moment", status=503)
        req_id = req.req_id or p.new_req_id()
        intake = Intake(req_id=req_id, worker_id=s.worker_id, source="http", raw_input=json.dumps(raw))
        gate.active += 1
        try:
            done: Execution = await runner.execute(req, req_id, on_delta=on_delta)
        except p.BadRequest as e:
            worker.ledger.record(Finished.refused(intake, e))
            raise
        finally:
            gate.active -= 1
        worker.ledger.record(Finished.ok(intake, done.facts))
        return done.body

    def handler(fn: Handler) -> Handler:
        async def wrapped(request: Request) -> Response:
            if (refused := refuse()) is not None:
                return refused
            try:
                return await fn(request)
            except p.BadRequest as e:
                return error(e.status, e.type, e.message)
            except ValidationError as e:
                err = e.errors()[0]
                return error(400, "invalid_request", f"{'.'.join(map(str, err['loc']))}: {err['msg']}")
        return wrapped

    def wrong_kind(route: str) -> p.BadRequest:
        return p.BadRequest("wrong_model_kind", f"{s.model_name} is a {s.model_kind} model and does not serve "
                            f"{route}; use {spec.http_route}", status=404)

    def inference_request(body: dict[str, Any], **extra: Any) -> p.InferenceRequest:
        if not spec.generates:
            raise wrong_kind("text generation")
        params = {k: body[k] for k in OPENAI_PARAMS if body.get(k) is not None}
        req = p.InferenceRequest.model_validate({"params": params, "stream": bool(body.get("stream")), **extra})
        req.check()
        return req

    def streamed(req: p.InferenceRequest, raw: dict[str, Any], chunk: Chunk,
                 final: Callable[[p.InferenceResponse], list[dict[str, Any]]]) -> StreamingResponse:
        """Server-sent events: one event per piece, then the final event(s), then `[DONE]`. The pieces come
        from the generation thread through the runner's DeltaPump, as they do for NATS streams."""
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        req_id = req.req_id = req.req_id or p.new_req_id()

        async def put(_index: int, delta: str) -> None:
            queue.put_nowait(delta)

        async def produce() -> p.InferenceResponse:
            pump = DeltaPump(put)
            try:
                out: p.InferenceResponse = await run(req, raw, on_delta=pump.push)
                return out
            finally:
                await pump.close()
                queue.put_nowait(None)

        async def events() -> AsyncIterator[str]:
            task = asyncio.create_task(produce())
            try:
                first = chunk(None, None)
                if first:
                    yield f"data: {json.dumps(first)}\n\n"
                while (piece := await queue.get()) is not None:
                    yield f"data: {json.dumps(chunk(piece, None))}\n\n"
                try:
                    out = await task
                except p.BadRequest as e:
                    yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type, 'code': e.status}})}\n\n"
                else:
                    for event in final(out):
                        yield f"data: {json.dumps(event)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                if not task.done():  # the client went away: stop generating for nobody
                    if worker.runner is not None:
                        worker.runner.cancel(req_id)
                    await asyncio.gather(task, return_exceptions=True)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def usage(out: p.InferenceResponse) -> dict[str, int]:
        return {"prompt_tokens": out.tokens_in, "completion_tokens": out.tokens_out,
                "total_tokens": out.tokens_in + out.tokens_out}

    @handler
    async def completions(request: Request) -> Response:
        body = await body_of(request)
        if "input" in body or "params" in body:  # the seed's body, answered in its own shape
            req = p.InferenceRequest.model_validate(body)
            req.check()
            if req.stream:
                return streamed(req, body, lambda d, _f: {"req_id": req.req_id, "delta": d} if d else {},
                                lambda out: [json.loads(p.dumps(out.model_copy(update={"done": True})))])
            out = await run(req, body)
            return Response(p.dumps(out), media_type="application/json")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise p.BadRequest("invalid_request", "prompt must be a string (one prompt per request)")
        req = inference_request(body, input=prompt, raw=True)
        cid, created = f"cmpl-{p.new_req_id()}", int(time.time())

        def text_chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            if text is None and finish is None:
                return {}
            return {"id": cid, "object": "text_completion", "created": created, "model": s.model_name,
                    "choices": [{"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            return streamed(req, body, text_chunk, lambda out: [text_chunk("", out.finish_reason)])
        out = await run(req, body)
        return JSONResponse({**text_chunk(out.text, out.finish_reason), "usage": usage(out)})

    @handler
    async def chat_completions(request: Request) -> Response:
        body = await body_of(request)
        messages = [{"role": m.get("role"), "content": _text(m.get("content"))} for m in body.get("messages") or []]
        req = inference_request(body, messages=messages)
        cid, created = f"chatcmpl-{p.new_req_id()}", int(time.time())

        def chat_chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            delta = {"role": "assistant", "content": ""} if text is None and finish is None else (
                {"content": text} if text else {})
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": s.model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        if req.stream:
            return streamed(req, body, chat_chunk, lambda out: [chat_chunk(None, out.finish_reason) | {
                "choices": [{"index": 0, "delta": {}, "finish_reason": out.finish_reason}]}])
        out = await run(req, body)
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
        req = p.EmbeddingRequest.model_validate({"input": body.get("input"), "model": body.get("model")})
        req.check()
        out = await run(req, body)
        data = [{"object": "embedding", "index": d.index,
                 "embedding": _b64(d.embedding) if body.get("encoding_format") == "base64" else d.embedding}
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


def _text(content: Any) -> str:
    """OpenAI message content: a string, or a list of parts of which the text ones count."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def _b64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
