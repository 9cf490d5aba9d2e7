"""What the worker's two HTTP modules share: OpenAI's error body, the refusal of a request as a 4xx, the 500 for
anything unexpected, and the body reader that refuses a body past the limit without holding it."""

from __future__ import annotations

import logging
import socket
import traceback
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import protocol as p
from .surface import Serving


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (OSError if it cannot be had), bound before the server starts: uvicorn's
    own bind failure is a log line and `sys.exit()` inside a task, which leaves a process hanging, not failing."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP by name, not 0 (what socket.create_server gives): asyncio turns Nagle off (TCP_NODELAY) only for
    # sockets whose proto says TCP, and accepted sockets inherit it. With proto 0 a response written in two pieces
    # waits for the client's delayed ACK: +40 ms on every HTTP request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock

# The request field a refusal is about, for the `param` of OpenAI's error body.
PARAM_OF = {"context_overflow": "max_tokens", "invalid_grammar": "grammar", "unknown_grammar": "grammar",
            "too_many_inputs": "input", "invalid_reply_to": "reply_to"}
log = logging.getLogger(__name__)


def error_fields(status: int, type_: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"message": message, "type": type_, "param": param, "code": status}


def error(status: int, type_: str, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": error_fields(status, type_, message, param)}, status_code=status)


def refusal(e: p.BadRequest | ValidationError, params: Mapping[str, str] = PARAM_OF) -> JSONResponse:
    """The OpenAI-shaped 4xx for a request the worker will not run; `param` names the field when it is known
    (`params`: error type -> field)."""
    if isinstance(e, ValidationError):
        where = ".".join(str(x) for x in e.errors()[0]["loc"])
        return error(400, "invalid_request", p.validation_message(e), where or None)
    return error(e.status, e.type, e.message, params.get(e.type))


def internal_error(worker: Serving, exc: BaseException, where: str) -> dict[str, Any]:
    """The contract's 500 body for a failure no route expected, logged here, once, with its traceback (stderr and
    the worker's event log, which `make logs` shows)."""
    log.error("HTTP %s failed", where, exc_info=exc)
    worker.store.event("http.error", f"{where}: {type(exc).__name__}: {str(exc)[:500]}", level="error",
                       traceback="".join(traceback.format_exception(exc))[-4000:])
    return error_fields(500, "internal_error", f"internal error: {type(exc).__name__}; see the worker log "
                        "(make logs)")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, read piece by piece and refused (413) as soon as it passes `limit` bytes, or before a byte is read
    when Content-Length says it will: a huge body costs the worker no memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise too_large(limit)
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_large(limit)
    return bytes(body)


def too_large(limit: int) -> p.BadRequest:
    return p.BadRequest("payload_too_large", f"the request body is larger than {limit} bytes (MAX_REQUEST_BYTES); "
                        "send a smaller one", status=413)


def json_object(raw: bytes) -> dict[str, Any]:
    body = p.loads(raw)
    if not isinstance(body, dict):
        raise p.BadRequest("invalid_request", "body must be a JSON object")
    return body


Handler = Callable[[Request], Awaitable[Response]]


def refusing(fn: Handler, params: Mapping[str, str] = PARAM_OF) -> Handler:
    """A route whose BadRequest and ValidationError become the OpenAI-shaped 4xx."""
    async def wrapped(request: Request) -> Response:
        try:
            return await fn(request)
        except (p.BadRequest, ValidationError) as e:
            return refusal(e, params)
    return wrapped


